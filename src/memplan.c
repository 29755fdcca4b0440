/* memplan: the per-rank memory of a training run on paper (see memplan.h). */
#define _GNU_SOURCE /* wait4 */
#include "memplan.h"

#include <fcntl.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "gather.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "model_compute.h"
#include "model_internal.h"
#include "phases.h"
#include "trainable.h"

/* The cuda backend's logits budget (cuda_ops.c: backend.h's logits_budget). */
#define DEVICE_LOGITS_BUDGET ((size_t)4 << 30)

/* What a rank holds, in bytes. */
struct rank_memory {
    double weights, gradients, adamw, activations, total;
    double export; /* on the CPU: what writing this rank's share of the exports holds */
};

/* The trainable set the estimate assumes. */
enum assumption { AS_DECK, AS_NO_EXPERT, AS_EVERY_EXPERT };

/* The process's resident set now (VmRSS, bytes), 0 when /proc cannot tell. */
static double resident_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    double kib = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) kib = strtod(line + 6, NULL);
    fclose(f);
    return kib * 1024.0;
}

extern char **environ;

/* The peak resident set of a bare esft process, bytes (0 when it cannot be run): `esft
 * --version` started apart (without this job's MPI environment, so as a singleton) and
 * its ru_maxrss read when it ends. Every esft process reaches it at its end, whatever it
 * did: the libraries' destructors fault in pages of their own (with CUDA linked,
 * libcublasLt's ~57 MiB), after the run's buffers are freed, so it is a floor under the
 * run's peak that the dry run's own VmRSS does not show. */
static double bare_process_peak(void)
{
    int n = 0;
    while (environ[n]) n++;
    char **env = xcalloc((size_t)n + 1, sizeof *env);
    int kept = 0;
    for (int i = 0; i < n; i++)
        if (strncmp(environ[i], "OMPI_", 5) != 0 && strncmp(environ[i], "PMIX_", 5) != 0 &&
            strncmp(environ[i], "PMI_", 4) != 0 && strncmp(environ[i], "SLURM_", 6) != 0)
            env[kept++] = environ[i];
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&files, 2, "/dev/null", O_WRONLY, 0);
    char *argv[] = {"esft", "--version", NULL};
    pid_t pid;
    double bytes = 0;
    if (posix_spawn(&pid, "/proc/self/exe", &files, NULL, argv, env) == 0) {
        int status;
        struct rusage usage;
        if (wait4(pid, &status, 0, &usage) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0)
            bytes = usage.ru_maxrss * 1024.0;
    }
    posix_spawn_file_actions_destroy(&files);
    free(env);
    return bytes;
}

/* Bytes of one layer's activations as workspace.c's alloc_layer makes them (LoRA's
 * adapters aside: method lora is not estimated). */
static double layer_bytes(const struct model_config *c, const struct layout_grid *grid, double N,
                          double cap, bool moe, bool dense, bool training)
{
    double H = c->hidden_size, nH = c->num_heads, f = 4;
    double qw, kvw, vw, aw;
    if (c->attention == ATTENTION_MLA) {
        qw = kvw = nH * (c->qk_nope_head_dim + c->qk_rope_head_dim);
        vw = aw = nH * c->v_head_dim;
    } else {
        qw = aw = nH * c->head_dim;
        kvw = vw = (double)c->num_kv_heads * c->head_dim;
    }
    double K = c->top_k > 0 ? c->top_k : 1, E = c->num_experts > 0 ? c->num_experts : 1;
    double M = N * K, I = c->expert_intermediate_size ? c->expert_intermediate_size : 1;
    double S = c->shared_expert_intermediate_size,
           D = c->intermediate_size ? c->intermediate_size : 1;
    double floats =
        5 * N * H + 2 * N + N * (qw + kvw + vw + aw); /* x xn h hn ffn, rstds, qkv attn */
    if (c->qk_norm != QK_NORM_NONE) floats += N * (qw + kvw + nH + c->num_kv_heads);
    if (c->clip_qkv > 0 && training) floats += N * (qw + kvw);
    if (c->attention == ATTENTION_MLA) {
        double R = c->q_lora_rank, C = c->kv_lora_rank;
        if (R > 0) floats += 2 * N * R + N;
        floats += 2 * N * C + N + N * c->qk_rope_head_dim +
                  N * nH * (c->qk_nope_head_dim + c->v_head_dim);
    }
    if (moe) {
        floats += N * E + (E + 1) + 2 * M + (training ? 3 : 2) * cap * I + M * H;
        if (grid->ep > 1) floats += 2 * cap * H + 2 * cap; /* xe, ye; the plan's row lists */
        if (S) floats += (training ? 3 : 2) * N * S + N * H + N;
    }
    if (dense) floats += (training ? 3 : 2) * N * D; /* the dense MLP's part */
    return floats * f;
}

/* Bytes of one forward workspace (workspace.c's workspace_new) for N tokens on the rank
 * of stage `stage` holding `local` experts per layer, on the device (the cuda backend)
 * or the CPU. */
static double workspace_bytes(const struct model_config *c, const struct layout_grid *grid,
                              const int *first, int stage, int local, double N, bool training,
                              bool recompute, bool densemixer, bool device)
{
    double H = c->hidden_size, f = 4, V = c->vocab_size;
    double K = c->top_k > 0 ? c->top_k : 1, E = c->num_experts > 0 ? c->num_experts : 1;
    double M = N * K, I = c->expert_intermediate_size ? c->expert_intermediate_size : 1;
    /* rows of the experts' buffers: allocated for the capacity (ws_row_capacity), the
     * whole of it on a device; on the CPU only the pages written are resident, the N K
     * rows a balanced routing sends each rank (more, towards the capacity, as it is
     * unbalanced) */
    double cap = (double)grid->ep * N * (K < (local > 0 ? local : 1) ? K : (local > 0 ? local : 1));
    if (!device && cap > M) cap = M;
    int l0 = first[stage], l1 = first[stage + 1];
    bool last = stage == grid->pp - 1;
    double bytes = 0;
    if (training && !recompute) {
        for (int l = l0; l < l1; l++)
            bytes += layer_bytes(c, grid, N, cap, c->is_moe[l], !c->is_moe[l], true);
    } else {
        /* one set for every layer, with the dense MLP's part (written, so resident on the
         * CPU, only when the stage has a dense layer) */
        bool any_moe = false, any_dense = false;
        for (int l = l0; l < l1; l++) any_moe |= c->is_moe[l] != 0, any_dense |= !c->is_moe[l];
        bytes += layer_bytes(c, grid, N, cap, any_moe, device || any_dense, training);
        if (recompute) bytes += (double)(l1 - l0 - 1) * N * H * f;
    }
    double floats = 2 * N * H + N + M * H; /* x_final, xn_final, rstd_final; xs */
    if (last) { /* the logits a vocabulary chunk at a time (workspace.c's vocab_chunk_size) */
        double chunk = WS_VOCAB_CHUNK;
        if (device) { /* as many as the budget holds, in multiples of WS_VOCAB_CHUNK */
            double ids = (double)(DEVICE_LOGITS_BUDGET / ((size_t)N * sizeof(float)));
            ids -= (double)((size_t)ids % WS_VOCAB_CHUNK);
            if (ids > chunk) chunk = ids;
        }
        floats += N * (V > chunk ? chunk : V) + 5 * N;
    }
    if (grid->ep > 1) floats += cap * H;
    int moe_layers = 0;
    for (int l = l0; l < l1; l++) moe_layers += c->is_moe[l] != 0;
    floats += moe_layers * (2 * M + N * E) + (double)c->num_layers * 2 * E + E;
    if (training) {
        double qw, kvw, vw, aw, nH = c->num_heads;
        if (c->attention == ATTENTION_MLA) {
            qw = kvw = nH * (c->qk_nope_head_dim + c->qk_rope_head_dim);
            vw = aw = nH * c->v_head_dim;
            double R = c->q_lora_rank > 0 ? c->q_lora_rank : 1;
            floats += N * R + N * c->kv_lora_rank + N * c->qk_rope_head_dim +
                      N * nH * (c->qk_nope_head_dim + c->v_head_dim);
        } else {
            qw = aw = nH * c->head_dim;
            kvw = vw = (double)c->num_kv_heads * c->head_dim;
        }
        double wide = c->intermediate_size;
        if (c->shared_expert_intermediate_size > wide) wide = c->shared_expert_intermediate_size;
        if (wide == 0) wide = 1;
        floats += 3 * N * H + N * (qw + kvw + vw + aw) + 2 * cap * H + M * H + 3 * cap * I + M +
                  N * E + 3 * N * wide + N;
        if (grid->ep > 1) floats += cap * H;
        if (densemixer && c->num_experts > 0) {
            double ep = grid->ep, R = ep * N, L = E / ep;
            floats += 3 * R * I + R * H + N * E;
            if (ep > 1) floats += 2 * R * H + R * L + N * E;
        }
    }
    return bytes + floats * f;
}

/* Marks the tensors the estimate trains. 0, or -1 with a message. */
static int choose_trainable(const struct deck *deck, struct model *m, enum assumption as,
                            const struct expert_config *ec, char *err, size_t err_size)
{
    bool *on = xcalloc((size_t)m->n_params, sizeof *on);
    int status = 0;
    if (as == AS_DECK) {
        status = trainable_select(m, deck->train.method, ec, on, err, err_size);
    } else {
        for (int i = 0; i < m->n_params; i++)
            on[i] = as == AS_EVERY_EXPERT && m->params[i].kind == PARAM_EXPERT;
    }
    for (int i = 0; i < m->n_params; i++) m->params[i].trainable = on[i];
    free(on);
    return status;
}

/* The memory of the rank at coords, on the CPU (device false) or the device. */
static void estimate(const struct deck *deck, const struct model_config *cfg,
                     const struct layout_grid *grid, const struct model *m, bool device,
                     struct rank_memory *out)
{
    double held = 0, trained = 0, frozen_matrices = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!model_holds(p, m->me)) continue;
        held += (double)p->numel;
        if (p->trainable) trained += (double)p->numel;
        if (model_stores_bf16(p)) frozen_matrices += (double)p->numel;
    }
    bool bf16_store = deck->model.frozen_weights == FROZEN_BF16;
    double weight_bytes = 4 * held - (bf16_store ? 2 * frozen_matrices : 0);
    if (device && !bf16_store && deck->model.dtype == DTYPE_BF16) /* bf16 copies beside fp32 */
        weight_bytes += 2 * frozen_matrices;
    const struct deck_train *tr = &deck->train;
    int per_rank = tr->global_batch / grid->dp, micro_batches = per_rank / tr->micro_batch;
    int n_ws = grid->pp - m->me.pp_rank;
    if (n_ws > micro_batches) n_ws = micro_batches > 0 ? micro_batches : 1;
    double N = (double)tr->micro_batch * deck->data.seq_len;
    bool dense_mixer = densemixer_enabled(tr);
    double ws = n_ws * workspace_bytes(cfg, grid, m->stage_first, m->me.pp_rank, m->n_local_experts,
                                       N, true, tr->recompute, dense_mixer, device);
    /* the validation workspace: allocated always, written only when validation runs */
    if (device || (tr->eval_every > 0 && tr->val_fraction > 0))
        ws += workspace_bytes(cfg, grid, m->stage_first, m->me.pp_rank, m->n_local_experts,
                              deck->data.seq_len, false, false, false, device);
    /* gradients summed over ranks: a scratch of their size (train.c's reduce_gradients),
     * on the host in both cases */
    bool reduced = grid->dp * grid->ep > 1;
    out->weights = weight_bytes;
    out->gradients = 4 * trained * (device || !reduced ? 1 : 2);
    out->adamw = 8 * trained;
    out->activations = ws;
    /* the exports at the end: each rank writes the tensors it provides (every tensor with
     * train.export_merged) into the shared files from where they are (export.c, gather.h,
     * st_stream.h), converted to the checkpoint's dtype through pieces of at most 2 MiB; a
     * tensor held as bf16 is read again from the checkpoint, in fp32 (the largest such
     * tensor the rank writes) */
    out->export = 0;
    if (!device) {
        int me = layout_rank_of(grid, m->me);
        bool writes = false;
        double reread = 0;
        for (int i = 0; i < m->n_params; i++) {
            const struct param *p = &m->params[i];
            if (!(p->trainable || tr->export_merged) || gather_provider(m, p) != me) continue;
            writes = true;
            if (bf16_store && model_stores_bf16(p) && 4.0 * (double)p->numel > reread)
                reread = 4.0 * (double)p->numel;
        }
        if (writes) out->export = reread + 2.0 * 1048576.0;
    }
    out->total = out->weights + out->gradients + out->adamw + out->activations + out->export;
}

static double in_unit(double bytes, double unit)
{
    return bytes / unit;
}

static void print_table(FILE *out, const struct deck *deck, const struct model_config *cfg,
                        const struct layout_grid *grid, enum assumption as,
                        const struct expert_config *ec, double baseline, double floor)
{
    /* one row per (stage, EP rank): the data-parallel copies hold the same */
    int rows = grid->pp * grid->ep;
    struct rank_memory *cpu = xcalloc((size_t)rows, sizeof *cpu),
                       *dev = xcalloc((size_t)rows, sizeof *dev);
    double most = 0, trained_share = 0, params = 0;
    for (int s = 0; s < grid->pp; s++)
        for (int e = 0; e < grid->ep; e++) {
            struct model m;
            model_table(&m, cfg, grid, (struct layout_coords){s, 0, e});
            char err[512];
            if (choose_trainable(deck, &m, as, ec, err, sizeof err) != 0) {
                fprintf(out, "# memory: not estimated: %s\n", err);
                model_free(&m);
                free(cpu);
                free(dev);
                return;
            }
            if (s == 0 && e == 0)
                for (int i = 0; i < m.n_params; i++) {
                    params += (double)m.params[i].numel;
                    if (m.params[i].trainable) trained_share += (double)m.params[i].numel;
                }
            int r = s * grid->ep + e;
            estimate(deck, cfg, grid, &m, false, &cpu[r]);
            cpu[r].total += baseline;
            if (cpu[r].total < floor) cpu[r].total = floor;
            estimate(deck, cfg, grid, &m, true, &dev[r]);
            if (cpu[r].total > most) most = cpu[r].total;
            model_free(&m);
        }
    double unit = most >= 10.0 * (1 << 30) ? (double)(1 << 30) : (double)(1 << 20);
    const char *unit_name = unit > (1 << 20) ? "GiB" : "MiB";
    const char *assumed = as == AS_NO_EXPERT      ? "lower bound: no routed expert trains"
                          : as == AS_EVERY_EXPERT ? "upper bound: every routed expert trains"
                                                  : "the deck's trainable set";
    fprintf(out,
            "# memory per rank for training (%s: %.4g%% of %.4g%s parameters train), %s;\n"
            "# micro-batch %d x %d tokens, %s\n",
            assumed, params > 0 ? 100.0 * trained_share / params : 0.0,
            params >= 1e9 ? params / 1e9 : params / 1e6, params >= 1e9 ? "B" : "M", unit_name,
            deck->train.micro_batch, deck->data.seq_len,
            deck->train.recompute ? "train.recompute: one layer's activations kept"
                                  : "every layer's activations kept");
    fprintf(out, "# %-5s %-7s | %9s %9s %9s %9s %9s %9s %9s | %9s %9s %9s %9s %9s\n", "stage",
            "ep_rank", "cpu:wts", "grads", "adamw", "activ", "export", "baseline", "total",
            "dev:wts", "grads", "adamw", "activ", "total");
    for (int s = 0; s < grid->pp; s++)
        for (int e = 0; e < grid->ep; e++) {
            const struct rank_memory *c = &cpu[s * grid->ep + e], *d = &dev[s * grid->ep + e];
            fprintf(out,
                    "  %-5d %-7d | %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f "
                    "%9.1f %9.1f\n",
                    s, e, in_unit(c->weights, unit), in_unit(c->gradients, unit),
                    in_unit(c->adamw, unit), in_unit(c->activations, unit),
                    in_unit(c->export, unit), in_unit(baseline, unit), in_unit(c->total, unit),
                    in_unit(d->weights, unit), in_unit(d->gradients, unit), in_unit(d->adamw, unit),
                    in_unit(d->activations, unit), in_unit(d->total, unit));
        }
    free(cpu);
    free(dev);
}

/* The model's config: the init section when init runs in this deck, else model.path's. */
static int load_config(const struct deck *deck, struct model_config *cfg, char *err,
                       size_t err_size)
{
    for (int i = 0; i < deck->n_phases; i++)
        if (deck->phases[i] == PHASE_INIT) return init_config(deck, cfg, err, err_size);
    if (!deck->model.path || !deck->model.path[0]) {
        snprintf(err, err_size, "model.path is not set");
        return -1;
    }
    return hfconfig_load(deck->model.path, cfg, err, err_size);
}

void memplan_print(FILE *out, const struct deck *deck, const struct layout_grid *grid)
{
    double baseline = resident_bytes(); /* before anything of the estimate's own */
    struct model_config cfg;
    char err[1024];
    if (load_config(deck, &cfg, err, sizeof err) != 0) {
        fprintf(out, "\n# memory: not estimated: %s\n", err);
        return;
    }
    if (deck->train.method == METHOD_LORA) {
        fprintf(out, "\n# memory: not estimated: train.method lora (its adapters are not in the "
                     "estimate yet)\n");
        return;
    }
    double floor = bare_process_peak();
    fprintf(out,
            "\n# memory: baseline %.1f MiB is this dry run's own resident set (VmRSS: "
            "libraries, MPI, the deck);\n# a bare esft process peaks at %.1f MiB (as it "
            "ends), the floor of the cpu total\n",
            baseline / 1048576.0, floor / 1048576.0);
    if (deck->train.method != METHOD_ESFT) {
        print_table(out, deck, &cfg, grid, AS_DECK, NULL, baseline, floor);
        return;
    }
    struct expert_config ec;
    const char *path = deck->train.expert_config;
    FILE *probe = path ? fopen(path, "r") : NULL;
    if (probe) {
        fclose(probe);
        if (expert_config_read(path, &cfg, &ec, err, sizeof err) != 0) {
            fprintf(out, "# memory: not estimated: %s\n", err);
            return;
        }
        fprintf(out, "# trainable experts from %s\n", path);
        print_table(out, deck, &cfg, grid, AS_DECK, &ec, baseline, floor);
        expert_config_free(&ec);
        return;
    }
    fprintf(out,
            "# %s is not there yet: the estimate is bounded by no routed expert and every "
            "one training (shared experts and non-expert modules frozen, as an expert "
            "configuration says unless its flags are set)\n",
            path ? path : "train.expert_config");
    print_table(out, deck, &cfg, grid, AS_NO_EXPERT, NULL, baseline, floor);
    print_table(out, deck, &cfg, grid, AS_EVERY_EXPERT, NULL, baseline, floor);
}
