/* c2r: C2R's collaborative lists, their file, the routing setup of a phase, and the
 * greedy expert placement (see c2r.h). */
#include "c2r.h"

#include <inttypes.h>
#include <jansson.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "files.h"
#include "layout.h"
#include "log.h"
#include "model.h"

/* ---- the lists ------------------------------------------------------------------- */

void c2r_layer_lists(const uint64_t *coact, int E, int T, int32_t *lists)
{
    unsigned char *taken = xcalloc((size_t)E, 1);
    for (int e = 0; e < E; e++) {
        const uint64_t *row = coact + (size_t)e * E;
        memset(taken, 0, (size_t)E);
        taken[e] = 1; /* the expert itself comes last: never among the first E - 1 */
        for (int t = 0; t < T; t++) {
            int best = -1;
            for (int j = 0; j < E; j++)
                if (!taken[j] && (best < 0 || row[j] > row[best])) best = j;
            taken[best] = 1;
            lists[(size_t)e * T + t] = best;
        }
    }
    free(taken);
}

static void write_text(FILE *out, const void *context)
{
    fputs(context, out);
    fputc('\n', out);
}

int c2r_write_config(const char *path, const char *model_dir,
                     const struct routing_stats *const *stats, const char *const *stats_paths,
                     int n_stats, int T, char *err, size_t err_size)
{
    const struct routing_stats *first = stats[0];
    int E = first->num_experts, Lm = first->n_moe_layers;
    if (T < 1 || T > E - 1) {
        snprintf(err, err_size,
                 "select.c2r_top_t (%d) must be in [1, %d] (the experts of a "
                 "layer but one)",
                 T, E - 1);
        return -1;
    }
    for (int i = 0; i < n_stats; i++)
        if (!stats[i]->coact) {
            snprintf(err, err_size,
                     "%s has no co-activation counts (/totals/coact), which "
                     "select.c2r_top_t needs: score with score.coactivation: true",
                     stats_paths[i]);
            return -1;
        }
    char config_path[4200];
    if (path_join(config_path, sizeof config_path, model_dir, "config.json", err, err_size))
        return -1;
    json_error_t jerr;
    json_t *config = json_load_file(config_path, 0, &jerr);
    if (!config || !json_is_object(config)) {
        snprintf(err, err_size, "%s: %s", config_path, config ? "not a JSON object" : jerr.text);
        json_decref(config);
        return -1;
    }
    size_t EE = (size_t)E * E;
    uint64_t *coact = xmalloc(EE * sizeof *coact);
    int32_t *lists = xmalloc((size_t)E * T * sizeof *lists);
    json_t *layers = json_array();
    for (int l = 0, m = 0; l < first->num_layers; l++) {
        json_t *layer = json_array();
        if (m < Lm && first->moe_layers[m] == l) {
            memset(coact, 0, EE * sizeof *coact);
            for (int i = 0; i < n_stats; i++)
                for (size_t x = 0; x < EE; x++) coact[x] += stats[i]->coact[(size_t)m * EE + x];
            c2r_layer_lists(coact, E, T, lists);
            for (int e = 0; e < E; e++) {
                json_t *row = json_array();
                for (int t = 0; t < T; t++)
                    json_array_append_new(row, json_integer(lists[(size_t)e * T + t]));
                json_array_append_new(layer, row);
            }
            m++;
        }
        json_array_append_new(layers, layer);
    }
    free(coact);
    free(lists);
    json_object_set_new(config, "top_t", json_integer(T));
    json_object_set_new(config, "collaborative_list", layers);
    int rc = hfconfig_write_json(path, config, err, err_size); /* as transformers writes one */
    json_decref(config);
    return rc;
}

int c2r_read_config(const char *path, const struct model_config *cfg, struct c2r_lists *lists,
                    char *err, size_t err_size)
{
    memset(lists, 0, sizeof *lists);
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, err_size, "%s: %s", path, jerr.text);
        return -1;
    }
    int E = cfg->num_experts, K = cfg->top_k, L = cfg->num_layers;
    json_t *top_t = json_object_get(root, "top_t");
    json_t *all = json_object_get(root, "collaborative_list");
    int low = K - 1 > 1 ? K - 1 : 1;
    if (!json_is_integer(top_t) || json_integer_value(top_t) < low ||
        json_integer_value(top_t) > E - 1) {
        snprintf(err, err_size,
                 "%s: top_t must be an integer in [%d, %d] (at least top-k - 1 "
                 "collaborators of the %d experts)",
                 path, low, E - 1, E);
        json_decref(root);
        return -1;
    }
    int T = (int)json_integer_value(top_t);
    if (!json_is_array(all) || (int)json_array_size(all) != L) {
        snprintf(err, err_size,
                 "%s: collaborative_list must be a list of %d entries, one per "
                 "decoder layer of the model",
                 path, L);
        json_decref(root);
        return -1;
    }
    *lists = (struct c2r_lists){.top_t = T, .num_layers = L, .num_experts = E};
    lists->collaborators = xmalloc((size_t)L * E * T * sizeof(int32_t));
    unsigned char *seen = xcalloc((size_t)E, 1);
    int rc = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        json_t *layer = json_array_get(all, (size_t)l);
        int32_t *out = lists->collaborators + (size_t)l * E * T;
        if (!cfg->is_moe[l]) {
            for (size_t x = 0; x < (size_t)E * T; x++) out[x] = -1;
            if (!json_is_array(layer) || json_array_size(layer) != 0) {
                snprintf(err, err_size,
                         "%s: collaborative_list[%d]: decoder layer %d is dense: "
                         "its entry must be []",
                         path, l, l);
                rc = -1;
            }
            continue;
        }
        if (!json_is_array(layer) || (int)json_array_size(layer) != E) {
            snprintf(err, err_size,
                     "%s: collaborative_list[%d] must hold %d lists, one per "
                     "expert",
                     path, l, E);
            rc = -1;
            break;
        }
        for (int e = 0; e < E && rc == 0; e++) {
            json_t *row = json_array_get(layer, (size_t)e);
            if (!json_is_array(row) || (int)json_array_size(row) != T) {
                snprintf(err, err_size,
                         "%s: collaborative_list[%d][%d] must hold top_t (%d) "
                         "expert ids",
                         path, l, e, T);
                rc = -1;
                break;
            }
            memset(seen, 0, (size_t)E);
            for (int t = 0; t < T; t++) {
                json_t *v = json_array_get(row, (size_t)t);
                json_int_t id = json_is_integer(v) ? json_integer_value(v) : -1;
                if (id < 0 || id >= E || id == e || seen[id]) {
                    snprintf(err, err_size,
                             "%s: collaborative_list[%d][%d][%d]: an expert id "
                             "in [0, %d), not %d itself and not repeated",
                             path, l, e, t, E, e);
                    rc = -1;
                    break;
                }
                seen[id] = 1;
                out[(size_t)e * T + t] = (int32_t)id;
            }
        }
    }
    free(seen);
    json_decref(root);
    if (rc != 0) c2r_lists_free(lists);
    return rc;
}

void c2r_lists_free(struct c2r_lists *lists)
{
    free(lists->collaborators);
    memset(lists, 0, sizeof *lists);
}

void c2r_attach(struct model *m, const struct c2r_lists *lists)
{
    if (!m->ops) fatal(EXIT_RUNTIME, "c2r_attach: the model is not attached to a backend");
    size_t bytes = (size_t)lists->num_layers * lists->num_experts * lists->top_t * sizeof(int32_t);
    if (m->ops->host_visible) {
        m->c2r_collaborators = xmalloc(bytes);
        memcpy(m->c2r_collaborators, lists->collaborators, bytes);
    } else {
        m->c2r_collaborators = m->ops->alloc(bytes);
        m->ops->upload(m->c2r_collaborators, lists->collaborators, bytes);
    }
    m->c2r_top_t = lists->top_t;
}

void c2r_phase_setup(const struct deck *deck, struct model *m, const char *phase,
                     int refuse_placement)
{
    if (refuse_placement && deck->parallel.expert_placement == PLACEMENT_C2R)
        fatal_all(EXIT_INPUT,
                  "%s: parallel.expert_placement c2r is not implemented for %s: the "
                  "EP exchange holds experts in contiguous blocks (parallel.expert_placement: "
                  "contiguous); the score phase reports what the c2r placement would save",
                  phase, phase);
    if (deck->model.routing != ROUTING_C2R) return;
    char err[1024];
    struct c2r_lists lists;
    fail_if_any(c2r_read_config(deck->model.c2r_config, &m->cfg, &lists, err, sizeof err) != 0,
                EXIT_INPUT, "%s: model.c2r_config: %s", phase, err);
    c2r_attach(m, &lists);
    log_info("%s: C2R routing, the other %d experts among the first one's top %d "
             "collaborators (%s)",
             phase, m->cfg.top_k - 1, lists.top_t, deck->model.c2r_config);
    c2r_lists_free(&lists);
}

/* ---- placement -------------------------------------------------------------------- */

void c2r_placement_contiguous(int E, int ep, int32_t *rank_of_expert)
{
    for (int e = 0; e < E; e++) rank_of_expert[e] = layout_expert_owner(E, ep, e);
}

struct pair {
    uint64_t count;
    int a, b;
};

static int by_count(const void *x, const void *y) /* descending count, then (a, b) */
{
    const struct pair *p = x, *q = y;
    if (p->count != q->count) return p->count > q->count ? -1 : 1;
    if (p->a != q->a) return p->a < q->a ? -1 : 1;
    return (p->b > q->b) - (p->b < q->b);
}

void c2r_placement_greedy(const uint64_t *coact, int E, int ep, int32_t *rank_of_expert)
{
    int size = E / ep, groups = 0;
    int *members = xcalloc((size_t)ep, sizeof *members);
    size_t n = 0;
    struct pair *pairs = xmalloc(((size_t)E * (E - 1) / 2 + 1) * sizeof *pairs);
    for (int a = 0; a < E; a++)
        for (int b = a + 1; b < E; b++)
            if (coact[(size_t)a * E + b] > 0)
                pairs[n++] = (struct pair){coact[(size_t)a * E + b], a, b};
    qsort(pairs, n, sizeof *pairs, by_count);
    for (int e = 0; e < E; e++) rank_of_expert[e] = -1;
    for (size_t i = 0; i < n && size > 1; i++) {
        int a = pairs[i].a, b = pairs[i].b, ga = rank_of_expert[a], gb = rank_of_expert[b];
        if (ga < 0 && gb < 0) {
            int g = groups < ep ? groups++ : -1; /* a new group, else the first with room */
            for (int h = 0; g < 0 && h < ep; h++)
                if (members[h] + 2 <= size) g = h;
            if (g < 0) continue;
            rank_of_expert[a] = rank_of_expert[b] = g;
            members[g] += 2;
        } else if (ga < 0 && members[gb] < size) {
            rank_of_expert[a] = gb;
            members[gb]++;
        } else if (gb < 0 && members[ga] < size) {
            rank_of_expert[b] = ga;
            members[ga]++;
        }
    }
    for (int e = 0, g = 0; e < E; e++) {
        if (rank_of_expert[e] >= 0) continue;
        while (members[g] == size) g++;
        rank_of_expert[e] = g;
        members[g]++;
    }
    free(pairs);
    free(members);
}

uint64_t c2r_destinations(const int32_t *ids, int N, int K, const int32_t *rank_of_expert)
{
    uint64_t total = 0;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int r = rank_of_expert[ids[(size_t)n * K + k]], repeated = 0;
            for (int j = 0; j < k; j++) repeated |= rank_of_expert[ids[(size_t)n * K + j]] == r;
            total += !repeated;
        }
    return total;
}

/* ---- the score phase's placement report ------------------------------------------- */

void c2r_kept_init(struct c2r_kept *kept, int n_moe_layers, int top_k)
{
    int Lm = n_moe_layers > 0 ? n_moe_layers : 1;
    *kept = (struct c2r_kept){.n_moe_layers = n_moe_layers,
                              .top_k = top_k,
                              .ids = xcalloc((size_t)Lm, sizeof(int32_t *)),
                              .tokens = xcalloc((size_t)Lm, sizeof(size_t)),
                              .capacity = xcalloc((size_t)Lm, sizeof(size_t))};
}

void c2r_kept_add(struct c2r_kept *kept, int m, const int32_t *ids, int N)
{
    size_t K = (size_t)kept->top_k, need = kept->tokens[m] + (size_t)N;
    if (need > kept->capacity[m]) {
        size_t capacity = kept->capacity[m] ? kept->capacity[m] : 1024;
        while (capacity < need) capacity *= 2;
        int32_t *grown = realloc(kept->ids[m], capacity * K * sizeof(int32_t));
        if (!grown)
            fatal(EXIT_RUNTIME,
                  "score: out of memory keeping the routing of %zu tokens "
                  "(parallel.expert_placement: c2r)",
                  need);
        kept->ids[m] = grown;
        kept->capacity[m] = capacity;
    }
    memcpy(kept->ids[m] + kept->tokens[m] * K, ids, (size_t)N * K * sizeof(int32_t));
    kept->tokens[m] = need;
}

void c2r_kept_free(struct c2r_kept *kept)
{
    for (int m = 0; m < kept->n_moe_layers; m++) free(kept->ids[m]);
    free(kept->ids);
    free(kept->tokens);
    free(kept->capacity);
    memset(kept, 0, sizeof *kept);
}

static int write_placement(const char *path, int ep, const struct model_config *cfg,
                           const int32_t *moe_layers, int Lm, const int32_t *rank_of_expert,
                           char *err, size_t err_size)
{
    json_t *layers = json_array();
    for (int l = 0, m = 0; l < cfg->num_layers; l++) {
        json_t *layer = json_array();
        if (m < Lm && moe_layers[m] == l) {
            for (int e = 0; e < cfg->num_experts; e++)
                json_array_append_new(
                    layer, json_integer(rank_of_expert[(size_t)m * cfg->num_experts + e]));
            m++;
        }
        json_array_append_new(layers, layer);
    }
    json_t *root = json_object();
    json_object_set_new(root, "ep", json_integer(ep));
    json_object_set_new(root, "placement", json_string("c2r"));
    json_object_set_new(root, "rank_of_expert", layers);
    char *text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text) {
        snprintf(err, err_size, "%s: cannot encode the placement", path);
        return -1;
    }
    int rc = file_write_atomically(path, write_text, text, err, err_size);
    free(text);
    return rc;
}

void c2r_placement_report(const struct deck *deck, const struct layout *layout,
                          const struct model_config *cfg, const int32_t *moe_layers,
                          const uint64_t *coact, const struct c2r_kept *kept)
{
    int E = cfg->num_experts, K = cfg->top_k, Lm = kept->n_moe_layers, ep = layout->grid.ep;
    size_t LE = (size_t)Lm * E;
    int32_t *greedy = xcalloc(LE ? LE : 1, sizeof *greedy),
            *contiguous = xmalloc((size_t)E * sizeof *contiguous);
    if (layout->world_rank == 0)
        for (int m = 0; m < Lm; m++)
            c2r_placement_greedy(coact + (size_t)m * E * E, E, ep, greedy + (size_t)m * E);
    check_mpi(MPI_Bcast(greedy, (int)LE, MPI_INT32_T, 0, MPI_COMM_WORLD));
    c2r_placement_contiguous(E, ep, contiguous);
    /* per layer: tokens, destination ranks (contiguous), destination ranks (c2r) */
    uint64_t *counts = xcalloc((size_t)(3 * (Lm ? Lm : 1)), sizeof *counts);
    for (int m = 0; m < Lm; m++) {
        int N = (int)kept->tokens[m];
        counts[3 * m] = (uint64_t)N;
        counts[3 * m + 1] = c2r_destinations(kept->ids[m], N, K, contiguous);
        counts[3 * m + 2] = c2r_destinations(kept->ids[m], N, K, greedy + (size_t)m * E);
    }
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, counts, 3 * Lm, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD));
    /* bytes of one step: per token, D (1 - 1/ep) remote rows (K (1 - 1/ep) one row per slot) */
    double step_tokens = (double)deck->train.global_batch * deck->data.seq_len;
    double row = (double)cfg->hidden_size * sizeof(float), remote = 1.0 - 1.0 / ep;
    double per_slot = 0, by_contiguous = 0, by_c2r = 0;
    for (int m = 0; m < Lm; m++) {
        double tokens = counts[3 * m] ? (double)counts[3 * m] : 1.0;
        per_slot += K * remote;
        by_contiguous += counts[3 * m + 1] / tokens * remote;
        by_c2r += counts[3 * m + 2] / tokens * remote;
    }
    double scale = 4.0 * step_tokens * row / 1048576.0; /* dispatch + combine, fwd + bwd, MiB */
    char path[4200], err[1024];
    int rc = 0;
    if (layout->world_rank == 0) {
        log_info("score: all-to-all per training step, ep %d (%d x %d tokens, %d MoE layers, rows "
                 "of %d fp32, dispatch and combine forward and backward): one row per (token, "
                 "expert) as esft sends %.2f MiB; one row per destination rank: contiguous "
                 "placement %.2f MiB, c2r placement %.2f MiB (%.1f%% less), from the routing of "
                 "%" PRIu64 " scored tokens",
                 ep, deck->train.global_batch, deck->data.seq_len, Lm, cfg->hidden_size,
                 per_slot * scale, by_contiguous * scale, by_c2r * scale,
                 by_contiguous > 0 ? 100.0 * (1.0 - by_c2r / by_contiguous) : 0.0,
                 Lm ? counts[0] : 0);
        metrics_write("expert_placement",
                      "\"ep\": %d, \"step_tokens\": %.0f, \"per_slot_mib\": %.6f, "
                      "\"contiguous_mib\": %.6f, \"c2r_mib\": %.6f",
                      ep, step_tokens, per_slot * scale, by_contiguous * scale, by_c2r * scale);
        rc = path_join(path, sizeof path, deck->run.output_dir, "expert_placement.json", err,
                       sizeof err);
        if (rc == 0) rc = write_placement(path, ep, cfg, moe_layers, Lm, greedy, err, sizeof err);
        if (rc == 0) log_info("score: c2r expert placement -> %s", path);
    }
    fail_if_any(rc != 0, EXIT_RUNTIME, "score: %s", err);
    free(counts);
    free(greedy);
    free(contiguous);
}
