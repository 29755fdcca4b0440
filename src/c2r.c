/* c2r: C2R's collaborative lists, their file, the routing setup of a phase, and the
 * greedy expert placement (see c2r.h). */
#include "c2r.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "files.h"
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

static bool reals_fit_15_digits(json_t *v)
{
    if (json_is_real(v)) {
        char text[40];
        snprintf(text, sizeof text, "%.15g", json_real_value(v));
        return strtod(text, NULL) == json_real_value(v);
    }
    const char *key;
    json_t *item;
    size_t i;
    if (json_is_object(v))
        json_object_foreach(v, key, item) if (!reals_fit_15_digits(item)) return false;
    if (json_is_array(v))
        json_array_foreach(v, i, item) if (!reals_fit_15_digits(item)) return false;
    return true;
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
        snprintf(err, err_size, "select.c2r_top_t (%d) must be in [1, %d] (the experts of a "
                 "layer but one)", T, E - 1);
        return -1;
    }
    for (int i = 0; i < n_stats; i++)
        if (!stats[i]->coact) {
            snprintf(err, err_size, "%s has no co-activation counts (/totals/coact), which "
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
    /* written as transformers writes a config: indent 2, sorted keys */
    size_t flags = JSON_INDENT(2) | JSON_SORT_KEYS | JSON_ENSURE_ASCII |
                   JSON_REAL_PRECISION(reals_fit_15_digits(config) ? 15 : 17);
    char *text = json_dumps(config, flags);
    json_decref(config);
    if (!text) {
        snprintf(err, err_size, "%s: cannot encode the configuration", path);
        return -1;
    }
    int rc = file_write_atomically(path, write_text, text, err, err_size);
    free(text);
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
        snprintf(err, err_size, "%s: top_t must be an integer in [%d, %d] (at least top-k - 1 "
                 "collaborators of the %d experts)", path, low, E - 1, E);
        json_decref(root);
        return -1;
    }
    int T = (int)json_integer_value(top_t);
    if (!json_is_array(all) || (int)json_array_size(all) != L) {
        snprintf(err, err_size, "%s: collaborative_list must be a list of %d entries, one per "
                 "decoder layer of the model", path, L);
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
                snprintf(err, err_size, "%s: collaborative_list[%d]: decoder layer %d is dense: "
                         "its entry must be []", path, l, l);
                rc = -1;
            }
            continue;
        }
        if (!json_is_array(layer) || (int)json_array_size(layer) != E) {
            snprintf(err, err_size, "%s: collaborative_list[%d] must hold %d lists, one per "
                     "expert", path, l, E);
            rc = -1;
            break;
        }
        for (int e = 0; e < E && rc == 0; e++) {
            json_t *row = json_array_get(layer, (size_t)e);
            if (!json_is_array(row) || (int)json_array_size(row) != T) {
                snprintf(err, err_size, "%s: collaborative_list[%d][%d] must hold top_t (%d) "
                         "expert ids", path, l, e, T);
                rc = -1;
                break;
            }
            memset(seen, 0, (size_t)E);
            for (int t = 0; t < T; t++) {
                json_t *v = json_array_get(row, (size_t)t);
                json_int_t id = json_is_integer(v) ? json_integer_value(v) : -1;
                if (id < 0 || id >= E || id == e || seen[id]) {
                    snprintf(err, err_size, "%s: collaborative_list[%d][%d][%d]: an expert id "
                             "in [0, %d), not %d itself and not repeated", path, l, e, t, E, e);
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
        fatal_all(EXIT_INPUT, "%s: parallel.expert_placement c2r is not implemented for %s: the "
                  "EP exchange holds experts in contiguous blocks (parallel.expert_placement: "
                  "contiguous); the score phase reports what the c2r placement would save",
                  phase, phase);
    if (deck->model.routing != ROUTING_C2R) return;
    if (strcmp(m->ops->name, "cuda") == 0)
        fatal_all(EXIT_INPUT, "%s: model.routing c2r is not implemented on the cuda backend; "
                  "use run.backend: cpu", phase);
    char err[1024];
    struct c2r_lists lists;
    fail_if_any(c2r_read_config(deck->model.c2r_config, &m->cfg, &lists, err, sizeof err) != 0,
                EXIT_INPUT, "%s: model.c2r_config: %s", phase, err);
    c2r_attach(m, &lists);
    log_info("%s: C2R routing, the other %d experts among the first one's top %d "
             "collaborators (%s)", phase, m->cfg.top_k - 1, lists.top_t, deck->model.c2r_config);
    c2r_lists_free(&lists);
}

/* ---- placement -------------------------------------------------------------------- */

void c2r_placement_contiguous(int E, int ep, int32_t *rank_of_expert)
{
    for (int e = 0; e < E; e++) rank_of_expert[e] = e / (E / ep);
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
