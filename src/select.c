/* select: the `select` phase (see select.h for the rules): routing statistics from the
 * score phase -> expert_config.json, its heatmap, and the list of tensors that train.
 * Called by main for decks whose phases include `select`; the pure functions are also
 * called by tests/test_select.c.
 *
 * Source of the rules: the ESFT paper and deepseek-ai/ESFT as summarised in
 * shared/reference/esft-semantics.md, section 2, minus the reference's known bugs (no
 * rounding of scores, no normalisation over the layer axis, no layer-key shift). */
#include "select.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "c2r.h"
#include "checksum.h"
#include "config.h"
#include "files.h"
#include "hfconfig.h"
#include "log.h"
#include "overlap.h"
#include "stability.h"

#define SELECT_ERR_MAX 4096

/* ---- scores and the per-layer rule -------------------------------------------------- */

void select_scores(const struct routing_stats *s, enum score_function function, double *scores)
{
    int Lm = s->n_moe_layers, E = s->num_experts;
    for (int l = 0; l < Lm; l++) {
        double tokens = (double)s->tokens[l];
        for (int e = 0; e < E; e++) {
            size_t i = (size_t)l * E + e;
            if (s->tokens[l] == 0)
                scores[i] = 0.0;
            else if (function == SCORE_FUNCTION_TOKEN)
                scores[i] = (double)s->count[i] / ((double)s->top_k * tokens);
            else
                scores[i] = s->gate[i] / tokens;
        }
    }
}

/* qsort over expert ids with the scores alongside: descending score, then lower id. */
struct ranked {
    double score;
    int expert;
};

static int by_score_then_id(const void *pa, const void *pb)
{
    const struct ranked *a = pa, *b = pb;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return (a->expert > b->expert) - (a->expert < b->expert);
}

void select_order(const double *scores, int num_experts, int *order)
{
    struct ranked *r = xmalloc((size_t)num_experts * sizeof *r);
    for (int e = 0; e < num_experts; e++) r[e] = (struct ranked){scores[e], e};
    qsort(r, (size_t)num_experts, sizeof *r, by_score_then_id);
    for (int e = 0; e < num_experts; e++) order[e] = r[e].expert;
    free(r);
}

int select_layer(const double *scores, int num_experts, double top_p, int *chosen,
                 double *cumulative)
{
    int *order = xmalloc((size_t)num_experts * sizeof *order);
    select_order(scores, num_experts, order);
    /* The running sum "reaches" top_p within a relative 1e-12: summing doubles must not
     * add an expert that the exact sum would not need. */
    const double reach = top_p * (1.0 - 1e-12);
    double sum = 0.0;
    int n = 0;
    for (int i = 0; i < num_experts; i++) {
        if (n > 0 && sum >= reach) break;
        chosen[n++] = order[i];
        sum += scores[order[i]];
    }
    free(order);
    *cumulative = sum;
    return n;
}

/* ---- several statistics files -------------------------------------------------------- */

int select_same_model(const struct routing_stats *a, const char *a_path,
                      const struct routing_stats *b, const char *b_path, char *err, size_t err_size)
{
    if (a->config_hash != b->config_hash) {
        snprintf(err, err_size,
                 "statistics files %s and %s come from different models: "
                 "config_hash %016" PRIx64 " (%s) vs %016" PRIx64 " (%s)",
                 a_path, b_path, a->config_hash, a->model_path, b->config_hash, b->model_path);
        return -1;
    }
    if (a->num_experts != b->num_experts) {
        snprintf(err, err_size,
                 "statistics files %s and %s come from different models: %d vs "
                 "%d experts",
                 a_path, b_path, a->num_experts, b->num_experts);
        return -1;
    }
    bool same_layers = a->n_moe_layers == b->n_moe_layers;
    for (int l = 0; same_layers && l < a->n_moe_layers; l++)
        same_layers = a->moe_layers[l] == b->moe_layers[l];
    if (!same_layers) {
        snprintf(err, err_size,
                 "statistics files %s and %s come from different models: their "
                 "MoE layers (/moe_layers) differ",
                 a_path, b_path);
        return -1;
    }
    return 0;
}

void select_sum_stats(const struct routing_stats *const *stats, int n_stats,
                      struct routing_stats *sum)
{
    const struct routing_stats *first = stats[0];
    size_t Lm = (size_t)first->n_moe_layers, E = (size_t)first->num_experts;
    memset(sum, 0, sizeof *sum);
    memcpy(sum->model_path, first->model_path, sizeof sum->model_path);
    memcpy(sum->model_type, first->model_type, sizeof sum->model_type);
    memcpy(sum->dataset, first->dataset, sizeof sum->dataset);
    memcpy(sum->tokens_scored, first->tokens_scored, sizeof sum->tokens_scored);
    sum->config_hash = first->config_hash;
    sum->num_layers = first->num_layers;
    sum->num_experts = first->num_experts;
    sum->top_k = first->top_k;
    sum->norm_topk_prob = first->norm_topk_prob;
    sum->n_moe_layers = first->n_moe_layers;
    sum->moe_layers = xmalloc(Lm * sizeof *sum->moe_layers);
    memcpy(sum->moe_layers, first->moe_layers, Lm * sizeof *sum->moe_layers);
    sum->tokens = xcalloc(Lm, sizeof *sum->tokens);
    sum->count = xcalloc(Lm * E, sizeof *sum->count);
    sum->gate = xcalloc(Lm * E, sizeof *sum->gate);
    for (int f = 0; f < n_stats; f++) {
        for (size_t l = 0; l < Lm; l++) sum->tokens[l] += stats[f]->tokens[l];
        for (size_t i = 0; i < Lm * E; i++) {
            sum->count[i] += stats[f]->count[i];
            sum->gate[i] += stats[f]->gate[i];
        }
    }
}

static void selection_alloc(struct expert_selection *sel, const struct routing_stats *s)
{
    size_t Lm = (size_t)s->n_moe_layers, E = (size_t)s->num_experts;
    sel->n_moe_layers = s->n_moe_layers;
    sel->num_experts = s->num_experts;
    sel->moe_layers = xmalloc(Lm * sizeof *sel->moe_layers);
    memcpy(sel->moe_layers, s->moe_layers, Lm * sizeof *sel->moe_layers);
    sel->scores = xcalloc(Lm * E, sizeof *sel->scores);
    sel->n_chosen = xcalloc(Lm, sizeof *sel->n_chosen);
    sel->chosen = xcalloc(Lm * E, sizeof *sel->chosen);
    sel->cumulative = xcalloc(Lm, sizeof *sel->cumulative);
}

void select_experts(const struct routing_stats *const *stats, int n_stats,
                    enum score_function function, double top_p, bool union_tasks,
                    struct expert_selection *sel)
{
    struct routing_stats sum;
    select_sum_stats(stats, n_stats, &sum);
    selection_alloc(sel, &sum);
    int Lm = sum.n_moe_layers, E = sum.num_experts;
    select_scores(&sum, function, sel->scores);
    if (!union_tasks) {
        for (int l = 0; l < Lm; l++)
            sel->n_chosen[l] = select_layer(&sel->scores[(size_t)l * E], E, top_p,
                                            &sel->chosen[(size_t)l * E], &sel->cumulative[l]);
        stats_free(&sum);
        return;
    }
    /* union: each file's own selection marks its experts; the summed score orders them */
    unsigned char *marked = xcalloc((size_t)Lm * E, 1);
    double *task_scores = xmalloc((size_t)Lm * E * sizeof *task_scores);
    int *task_chosen = xmalloc((size_t)E * sizeof *task_chosen);
    for (int f = 0; f < n_stats; f++) {
        select_scores(stats[f], function, task_scores);
        for (int l = 0; l < Lm; l++) {
            double cumulative;
            int n = select_layer(&task_scores[(size_t)l * E], E, top_p, task_chosen, &cumulative);
            for (int i = 0; i < n; i++) marked[(size_t)l * E + task_chosen[i]] = 1;
        }
    }
    int *order = xmalloc((size_t)E * sizeof *order);
    for (int l = 0; l < Lm; l++) {
        const double *scores = &sel->scores[(size_t)l * E];
        select_order(scores, E, order);
        int n = 0;
        double cumulative = 0.0;
        for (int i = 0; i < E; i++)
            if (marked[(size_t)l * E + order[i]]) {
                sel->chosen[(size_t)l * E + n++] = order[i];
                cumulative += scores[order[i]];
            }
        sel->n_chosen[l] = n;
        sel->cumulative[l] = cumulative;
    }
    free(order);
    free(task_chosen);
    free(task_scores);
    free(marked);
    stats_free(&sum);
}

void expert_selection_free(struct expert_selection *sel)
{
    free(sel->moe_layers);
    free(sel->scores);
    free(sel->n_chosen);
    free(sel->chosen);
    free(sel->cumulative);
    memset(sel, 0, sizeof *sel);
}

bool select_is_chosen(const struct expert_selection *sel, int layer, int expert)
{
    for (int l = 0; l < sel->n_moe_layers; l++) {
        if (sel->moe_layers[l] != layer) continue;
        for (int i = 0; i < sel->n_chosen[l]; i++)
            if (sel->chosen[(size_t)l * sel->num_experts + i] == expert) return true;
        return false;
    }
    return false;
}

int select_count(const struct expert_selection *sel)
{
    int n = 0;
    for (int l = 0; l < sel->n_moe_layers; l++) n += sel->n_chosen[l];
    return n;
}

/* ---- the tensors that train -------------------------------------------------------- */

static void push_name(char ***names, int *n, int *capacity, const char *name)
{
    if (*n == *capacity) {
        *capacity = *capacity ? 2 * *capacity : 64;
        char **grown = realloc(*names, (size_t)*capacity * sizeof *grown);
        if (!grown) fatal(EXIT_RUNTIME, "out of memory (tensor names)");
        *names = grown;
    }
    (*names)[(*n)++] = xstrdup(name);
}

char **select_tensor_names(const struct expert_selection *sel, const struct model *model,
                           bool train_shared_experts, bool train_non_expert_modules, int *n_names)
{
    char **names = NULL;
    int n = 0, capacity = 0;
    if (!model) {
        static const char *parts[3] = {"gate_proj", "up_proj", "down_proj"};
        char name[PARAM_NAME_MAX];
        for (int l = 0; l < sel->n_moe_layers; l++)
            for (int p = 0; p < 3; p++)
                for (int e = 0; e < sel->num_experts; e++) {
                    if (!select_is_chosen(sel, sel->moe_layers[l], e)) continue;
                    snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%d.%s.weight",
                             (int)sel->moe_layers[l], e, parts[p]);
                    push_name(&names, &n, &capacity, name);
                }
        *n_names = n;
        return names;
    }
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        bool trains;
        switch (p->kind) {
        case PARAM_EXPERT:
            trains = select_is_chosen(sel, p->layer, p->expert);
            break;
        case PARAM_SHARED_EXPERT:
            trains = train_shared_experts;
            break;
        default:
            trains = train_non_expert_modules;
            break;
        }
        if (trains) push_name(&names, &n, &capacity, p->name);
    }
    *n_names = n;
    return names;
}

void select_free_names(char **names, int n_names)
{
    for (int i = 0; i < n_names; i++) free(names[i]);
    free(names);
}

/* ---- output files ------------------------------------------------------------------ */

/* The shortest %g form that reads back as the same double. */
static void format_double(double value, char *buf, size_t size)
{
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(buf, size, "%.*g", precision, value);
        if (strtod(buf, NULL) == value) return;
    }
}

static void json_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(out, "\\%c", *c);
        else if (*c < 0x20)
            fprintf(out, "\\u%04x", *c);
        else
            fputc(*c, out);
    }
    fputc('"', out);
}

static const char *score_function_label(enum score_function function)
{
    return function == SCORE_FUNCTION_GATE ? "gate" : "token";
}

struct config_context {
    const struct expert_selection *selection;
    const struct select_report *report;
};

/* The "stability" member: select.bootstrap's figures (stability.h). */
/* n numbers as a JSON list, each in its shortest exact form. */
static void json_numbers(FILE *out, const double *v, int n)
{
    char number[40];
    fputc('[', out);
    for (int i = 0; i < n; i++) {
        format_double(v[i], number, sizeof number);
        fprintf(out, "%s%s", i ? ", " : "", number);
    }
    fputc(']', out);
}

static void stability_json(FILE *out, const struct expert_selection *s, const struct stability *st)
{
    char number[40];
    int E = s->num_experts;
    fprintf(out, ",\n  \"stability\": {\n    \"resamples\": %d, \"seed\": %" PRIu64
            ", \"samples\": %" PRIu64 ",\n", st->resamples, st->seed, st->n_samples);
    format_double(st->mean_jaccard, number, sizeof number);
    fprintf(out, "    \"mean_jaccard\": %s,\n    \"layer_jaccard\": {", number);
    for (int l = 0; l < s->n_moe_layers; l++) {
        format_double(st->layer_jaccard[l], number, sizeof number);
        fprintf(out, "%s\"%d\": %s", l ? ", " : "", (int)s->moe_layers[l], number);
    }
    fputs("},\n    \"inclusion\": {", out);
    for (int l = 0; l < s->n_moe_layers; l++) {
        fprintf(out, "%s\n      \"%d\": ", l ? "," : "", (int)s->moe_layers[l]);
        json_numbers(out, st->inclusion + (size_t)l * E, E);
    }
    fputs("\n    },\n    \"by_fraction\": [", out);
    for (int f = 0; f < STABILITY_FRACTIONS; f++) {
        char tokens[40], jac[40];
        format_double(st->fraction[f], number, sizeof number);
        format_double(st->fraction_tokens[f], tokens, sizeof tokens);
        format_double(st->fraction_jaccard[f], jac, sizeof jac);
        fprintf(out, "%s\n      {\"fraction\": %s, \"tokens\": %s, \"mean_jaccard\": %s}",
                f ? "," : "", number, tokens, jac);
    }
    format_double(st->target, number, sizeof number);
    fprintf(out, "\n    ],\n    \"target\": %s, \"tokens_needed\": ", number);
    if (st->tokens_needed < 0) fputs("null", out);
    else {
        format_double(st->tokens_needed, number, sizeof number);
        fputs(number, out);
    }
    fputs("\n  }", out);
}

/* A [T, T] matrix as rows of numbers. */
static void json_matrix(FILE *out, const double *m, int T)
{
    fputc('[', out);
    for (int a = 0; a < T; a++) {
        if (a) fputs(", ", out);
        json_numbers(out, m + (size_t)a * T, T);
    }
    fputc(']', out);
}

/* The "tasks" member: tasks side by side (overlap.h). Row a, column b; mean_* over the
 * MoE layers. */
static void tasks_json(FILE *out, const struct task_overlap *o)
{
    int T = o->n_tasks, Lm = o->n_moe_layers, E = o->num_experts;
    const int32_t *layers = o->tasks[0].moe_layers;
    fputs(",\n  \"tasks\": {\n    \"paths\": [", out);
    for (int a = 0; a < T; a++) {
        if (a) fputs(", ", out);
        json_string(out, o->paths[a]);
    }
    fputs("],\n    \"experts\": [", out);
    for (int a = 0; a < T; a++) {
        const struct expert_selection *s = &o->tasks[a];
        fprintf(out, "%s\n      {", a ? "," : "");
        for (int l = 0; l < Lm; l++) {
            fprintf(out, "%s\"%d\": [", l ? ", " : "", (int)layers[l]);
            for (int i = 0; i < s->n_chosen[l]; i++)
                fprintf(out, "%s%d", i ? ", " : "", s->chosen[(size_t)l * E + i]);
            fputc(']', out);
        }
        fputc('}', out);
    }
    fputs("\n    ]", out);
    static const char *names[2] = {"jaccard", "share"};
    const double *per_layer[2] = {o->jaccard, o->share},
                 *mean[2] = {o->mean_jaccard, o->mean_share};
    for (int k = 0; k < 2; k++) {
        fprintf(out, ",\n    \"%s\": {", names[k]);
        for (int l = 0; l < Lm; l++) {
            fprintf(out, "%s\n      \"%d\": ", l ? "," : "", (int)layers[l]);
            json_matrix(out, per_layer[k] + (size_t)l * T * T, T);
        }
        fprintf(out, "\n    },\n    \"mean_%s\": ", names[k]);
        json_matrix(out, mean[k], T);
    }
    fputs("\n  }", out);
}

static void config_body(FILE *out, const void *context)
{
    const struct config_context *c = context;
    const struct expert_selection *s = c->selection;
    const struct select_report *r = c->report;
    int Lm = s->n_moe_layers, E = s->num_experts;
    char number[40];
    /* the reference's members first, one MoE layer per line */
    fputs("{\n  \"experts\": {", out);
    for (int l = 0; l < Lm; l++) {
        fprintf(out, "%s\n    \"%d\": [", l ? "," : "", (int)s->moe_layers[l]);
        for (int i = 0; i < s->n_chosen[l]; i++)
            fprintf(out, "%s%d", i ? ", " : "", s->chosen[(size_t)l * E + i]);
        fputc(']', out);
    }
    fprintf(out, "\n  },\n  \"shared_experts\": %s,\n  \"non_expert_modules\": %s,\n",
            r->shared_experts ? "true" : "false", r->non_expert_modules ? "true" : "false");
    /* ours: how the selection was made and from what */
    fprintf(out, "  \"score_function\": \"%s\",\n", score_function_label(r->score_function));
    format_double(r->top_p, number, sizeof number);
    fprintf(out, "  \"top_p\": %s,\n  \"union_tasks\": %s,\n  \"scores\": {", number,
            r->union_tasks ? "true" : "false");
    for (int l = 0; l < Lm; l++) {
        fprintf(out, "%s\n    \"%d\": ", l ? "," : "", (int)s->moe_layers[l]);
        json_numbers(out, s->scores + (size_t)l * E, E);
    }
    fputs("\n  },\n  \"cumulative\": {", out);
    for (int l = 0; l < Lm; l++) {
        format_double(s->cumulative[l], number, sizeof number);
        fprintf(out, "%s\n    \"%d\": %s", l ? "," : "", (int)s->moe_layers[l], number);
    }
    fputs("\n  },\n  \"sources\": [", out);
    for (int i = 0; i < r->n_sources; i++) {
        const struct select_source *src = &r->sources[i];
        fprintf(out, "%s\n    {\"path\": ", i ? "," : "");
        json_string(out, src->path);
        const struct routing_stats *st = src->stats;
        fprintf(out, ", \"checksum\": \"%s\",\n     \"model_path\": ", src->checksum);
        json_string(out, st->model_path);
        fputs(", \"model_type\": ", out);
        json_string(out, st->model_type);
        fprintf(out,
                ", \"config_hash\": \"%016" PRIx64 "\",\n     \"dataset\": ", src->config_hash);
        json_string(out, st->dataset);
        fputs(", \"dataset_checksum\": ", out);
        json_string(out, st->dataset_checksum);
        fputs(",\n     \"tokenizer\": ", out);
        json_string(out, st->tokenizer);
        fputs(", \"tokenizer_checksum\": ", out);
        json_string(out, st->tokenizer_checksum);
        fprintf(out,
                ",\n     \"seed\": %lld, \"n_sample_tokens\": %lld, \"tokens_scored\": \"%s\", "
                "\"tokens\": %" PRIu64 ", \"ranks\": {\"world\": %d, \"pp\": %d, \"dp\": %d, "
                "\"ep\": %d}}",
                st->seed, st->n_sample_tokens, st->tokens_scored, src->tokens, st->world, st->pp,
                st->dp, st->ep);
    }
    fputs("\n  ],\n  \"model_path\": ", out);
    json_string(out, r->model_path ? r->model_path : "");
    fprintf(out, ",\n  \"esft_version\": \"%s\"", PACKAGE_VERSION);
    if (r->stability) stability_json(out, s, r->stability);
    if (r->tasks) tasks_json(out, r->tasks);
    fputs("\n}\n", out);
}

int select_write_config(const char *path, const struct expert_selection *selection,
                        const struct select_report *report, char *err, size_t err_size)
{
    struct config_context context = {selection, report};
    return file_write_atomically(path, config_body, &context, err, err_size);
}

struct names_context {
    char *const *names;
    int n_names;
};

static void names_body(FILE *out, const void *context)
{
    const struct names_context *c = context;
    for (int i = 0; i < c->n_names; i++) fprintf(out, "%s\n", c->names[i]);
}

int select_write_names(const char *path, char *const *names, int n_names, char *err,
                       size_t err_size)
{
    struct names_context context = {names, n_names};
    return file_write_atomically(path, names_body, &context, err, err_size);
}

/* ---- the heatmap ------------------------------------------------------------------- */

static int clamp_int(int v, int lo, int hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static void svg_body(FILE *out, const void *context)
{
    const struct config_context *c = context;
    const struct expert_selection *s = c->selection;
    const struct select_report *r = c->report;
    int Lm = s->n_moe_layers, E = s->num_experts;
    /* cells sized so that 128 experts x 48 layers stay about 1000 x 700 pixels */
    int cell_w = clamp_int(960 / E, 7, 36), cell_h = clamp_int(640 / Lm, 12, 32);
    int left = 64, top = 78, map_w = cell_w * E, map_h = cell_h * Lm;
    int legend_x = left + map_w + 28, width = legend_x + 110;
    if (width < 720) width = 720; /* room for the title */
    int height = top + (map_h > 220 ? map_h : 220) + 56;
    double max_score = 0;
    for (size_t i = 0; i < (size_t)Lm * E; i++)
        if (s->scores[i] > max_score) max_score = s->scores[i];
    double scale = max_score > 0 ? max_score : 1;
    char colour[8], number[40];

    svg_begin(out, width, height);
    format_double(r->top_p, number, sizeof number);
    fprintf(out,
            "<text x=\"%d\" y=\"24\" font-size=\"16\" font-weight=\"bold\">ESFT expert "
            "selection: %s score, top_p = %s%s</text>\n",
            left, score_function_label(r->score_function), number,
            r->union_tasks ? " (union of tasks)" : "");
    fprintf(out, "<text x=\"%d\" y=\"44\" font-size=\"11\" fill=\"#444\">", left);
    xml_write_text(out, r->model_path && r->model_path[0] ? r->model_path : "model");
    fprintf(out, ": %d of %d experts chosen in %d MoE layers; outlined = chosen</text>\n",
            select_count(s), Lm * E, Lm);

    /* axes: layer labels on the left, expert ticks below */
    fprintf(out,
            "<text x=\"14\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\" "
            "transform=\"rotate(-90 14 %d)\">decoder layer</text>\n",
            top + map_h / 2, top + map_h / 2);
    int font = cell_h >= 14 ? 10 : 9;
    for (int l = 0; l < Lm; l++)
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"%d\" text-anchor=\"end\" "
                "dominant-baseline=\"central\">%d</text>\n",
                left - 6, top + l * cell_h + cell_h / 2, font, (int)s->moe_layers[l]);
    int step = 1;
    while (step * cell_w < 22) step *= 2;
    for (int e = 0; e < E; e += step) {
        int x = left + e * cell_w + cell_w / 2;
        fprintf(out, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#444\"/>\n", x,
                top + map_h, x, top + map_h + 4);
        fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"10\" text-anchor=\"middle\">%d</text>\n",
                x, top + map_h + 15, e);
    }
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">expert</text>\n",
            left + map_w / 2, top + map_h + 34);

    /* cells, then the outlines of the chosen ones on top */
    fputs("<g shape-rendering=\"crispEdges\">\n", out);
    for (int l = 0; l < Lm; l++)
        for (int e = 0; e < E; e++) {
            double score = s->scores[(size_t)l * E + e];
            svg_viridis(score / scale, colour);
            format_double(score, number, sizeof number);
            fprintf(out,
                    "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\">"
                    "<title>layer %d, expert %d: %s%s</title></rect>\n",
                    left + e * cell_w, top + l * cell_h, cell_w, cell_h, colour,
                    (int)s->moe_layers[l], e, number,
                    select_is_chosen(s, s->moe_layers[l], e) ? " (chosen)" : "");
        }
    fputs("</g>\n<g fill=\"none\" stroke=\"#ff2020\" stroke-width=\"1.5\">\n", out);
    for (int l = 0; l < Lm; l++)
        for (int i = 0; i < s->n_chosen[l]; i++) {
            int e = s->chosen[(size_t)l * E + i];
            fprintf(out, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\"/>\n",
                    left + e * cell_w + 0.75, top + l * cell_h + 0.75, cell_w - 1.5, cell_h - 1.5);
        }
    fputs("</g>\n", out);

    /* legend: the colour scale from 0 (bottom) to the largest score (top) */
    int bar_h = 160, bar_y = top;
    fputs("<defs><linearGradient id=\"scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n", out);
    for (int i = 0; i <= 8; i++) {
        svg_viridis(i / 8.0, colour);
        fprintf(out, "<stop offset=\"%.3f\" stop-color=\"%s\"/>\n", i / 8.0, colour);
    }
    fputs("</linearGradient></defs>\n", out);
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"11\">%s score</text>\n", legend_x, bar_y - 16,
            score_function_label(r->score_function));
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"16\" height=\"%d\" fill=\"url(#scale)\" "
            "stroke=\"#444\" stroke-width=\"0.5\"/>\n",
            legend_x, bar_y, bar_h);
    for (int i = 0; i <= 4; i++) {
        double value = max_score * (4 - i) / 4.0;
        int y = bar_y + bar_h * i / 4;
        fprintf(out, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#444\"/>\n",
                legend_x + 16, y, legend_x + 20, y);
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"10\" dominant-baseline=\"central\">"
                "%.3g</text>\n",
                legend_x + 23, y, value);
    }
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"16\" height=\"12\" fill=\"#ccc\" "
            "stroke=\"#ff2020\" stroke-width=\"1.5\"/>\n",
            legend_x, bar_y + bar_h + 20);
    fprintf(out,
            "<text x=\"%d\" y=\"%d\" font-size=\"11\" dominant-baseline=\"central\">"
            "chosen</text>\n",
            legend_x + 23, bar_y + bar_h + 26);
    fputs("</svg>\n", out);
}

int select_write_svg(const char *path, const struct expert_selection *selection,
                     const struct select_report *report, char *err, size_t err_size)
{
    struct config_context context = {selection, report};
    return file_write_atomically(path, svg_body, &context, err, err_size);
}

/* ---- the phase ----------------------------------------------------------------------- */

/* Checks that the statistics describe the checkpoint at model.path: the same config.json
 * (hash), expert count and MoE layers. */
static int check_against_model(const struct routing_stats *s, const char *stats_path,
                               const char *model_path, const struct model_config *cfg, char *err,
                               size_t err_size)
{
    if (s->config_hash != cfg->hash) {
        snprintf(err, err_size,
                 "%s comes from another model than model.path: its config_hash "
                 "is %016" PRIx64 " (scored model %s), %s/config.json hashes to %016" PRIx64,
                 stats_path, s->config_hash, s->model_path, model_path, cfg->hash);
        return -1;
    }
    if (s->num_experts != cfg->num_experts || s->num_layers != cfg->num_layers) {
        snprintf(err, err_size,
                 "%s: %d decoder layers with %d experts, but %s/config.json has "
                 "%d layers with %d experts",
                 stats_path, s->num_layers, s->num_experts, model_path, cfg->num_layers,
                 cfg->num_experts);
        return -1;
    }
    int l_stats = 0;
    for (int l = 0; l < cfg->num_layers; l++) {
        bool in_stats = l_stats < s->n_moe_layers && s->moe_layers[l_stats] == l;
        if (in_stats != (cfg->is_moe[l] != 0)) {
            snprintf(err, err_size,
                     "%s: decoder layer %d is %s in the statistics (/moe_layers) "
                     "but %s in %s/config.json",
                     stats_path, l, in_stats ? "MoE" : "absent",
                     cfg->is_moe[l] ? "a MoE layer" : "a dense layer", model_path);
            return -1;
        }
        if (in_stats) l_stats++;
    }
    return 0;
}

/* out = dir/name, or name when it is absolute. */
static void join_path(char *out, size_t size, const char *dir, const char *name)
{
    if (name[0] == '/' || !dir || !dir[0])
        snprintf(out, size, "%s", name);
    else
        snprintf(out, size, "%s/%s", dir, name);
}

/* The directory part of path ("." when none), for make_directories. */
static void parent_of(const char *path, char *out, size_t size)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(out, size, ".");
    else if (slash == path)
        snprintf(out, size, "/");
    else
        snprintf(out, size, "%.*s", (int)(slash - path), path);
}

/* Everything rank 0 does. Returns 0, EXIT_INPUT or EXIT_RUNTIME with a message in err. */
static int select_on_rank0(const struct deck *deck, char *err, size_t err_size)
{
    const struct deck_select *in = &deck->select;
    if (!(in->top_p > 0 && in->top_p <= 1)) {
        snprintf(err, err_size, "select.top_p (%g) must be in (0, 1]", in->top_p);
        return EXIT_INPUT;
    }
    /* the statistics files: as listed, or this run's score output */
    char default_stats[4200];
    const char *paths[DECK_MAX_LIST];
    int n_stats = in->n_stats;
    for (int i = 0; i < n_stats; i++) paths[i] = in->stats[i];
    if (n_stats == 0) {
        join_path(default_stats, sizeof default_stats, deck->run.output_dir, deck->score.output);
        paths[0] = default_stats;
        n_stats = 1;
    }

    struct routing_stats *stats = xcalloc((size_t)n_stats, sizeof *stats);
    const struct routing_stats **views = xcalloc((size_t)n_stats, sizeof *views);
    struct expert_selection selection = {0};
    struct stability stability;
    bool have_stability = false;
    struct task_overlap tasks;
    bool have_tasks = false;
    struct model model;
    bool have_model = false;
    char **names = NULL;
    int n_names = 0, n_read = 0, status = EXIT_INPUT;

    for (int i = 0; i < n_stats; i++) {
        if (stats_read(paths[i], &stats[i], err, err_size) != 0) goto done;
        n_read = i + 1;
        views[i] = &stats[i];
        for (int l = 0; l < stats[i].n_moe_layers; l++)
            if (stats[i].tokens[l] == 0) {
                snprintf(err, err_size,
                         "%s: MoE layer %d saw no tokens (/totals/tokens); "
                         "nothing to select from",
                         paths[i], (int)stats[i].moe_layers[l]);
                goto done;
            }
        if (i > 0 && select_same_model(&stats[0], paths[0], &stats[i], paths[i], err, err_size))
            goto done;
    }

    const char *model_path = deck->model.path && deck->model.path[0] ? deck->model.path : NULL;
    if (model_path) {
        struct model_config cfg;
        if (hfconfig_load(model_path, &cfg, err, err_size) != 0) goto done;
        if (check_against_model(&stats[0], paths[0], model_path, &cfg, err, err_size) != 0)
            goto done;
        /* The names do not depend on the grid. One decoder layer per stage and one expert
         * per EP rank keep the storage model_create allocates for the rank it describes
         * small: the table is all this phase needs. */
        int E = cfg.num_experts;
        struct layout_grid grid = {
            .world = cfg.num_layers * E, .pp = cfg.num_layers, .dp = 1, .ep = E};
        struct layout_coords me = {
            .pp_rank = cfg.num_layers > 2 ? 1 : 0, .dp_rank = 0, .ep_rank = 0};
        model_create(&model, &cfg, &grid, me);
        have_model = true;
    }

    select_experts(views, n_stats, in->score_function, in->top_p, in->union_tasks, &selection);
    if (in->bootstrap > 0) {
        if (stability_run(views, paths, n_stats, in->score_function, in->top_p, &selection,
                          in->bootstrap, (uint64_t)deck->run.seed, in->stability_target,
                          &stability, err, err_size) != 0)
            goto done;
        have_stability = true;
    }
    if (n_stats >= 2) {
        overlap_run(views, paths, n_stats, in->score_function, in->top_p, &tasks);
        have_tasks = true;
    }
    names = select_tensor_names(&selection, have_model ? &model : NULL, in->train_shared_experts,
                                in->train_non_expert_modules, &n_names);

    /* C2R's lists need the co-activation counts of every file */
    if (in->c2r_top_t > 0) {
        if (in->c2r_top_t > stats[0].num_experts - 1) {
            snprintf(err, err_size, "select.c2r_top_t (%d) must be at most %d (the experts of "
                     "a layer but one)", in->c2r_top_t, stats[0].num_experts - 1);
            goto done;
        }
        for (int i = 0; i < n_stats; i++)
            if (!stats[i].coact) {
                snprintf(err, err_size, "%s has no co-activation counts (/totals/coact), which "
                         "select.c2r_top_t needs: score with score.coactivation: true", paths[i]);
                goto done;
            }
    }

    /* every check passed: now the outputs */
    status = EXIT_RUNTIME;
    char config_path[4200], svg_path[4300], names_path[4200], dir[4200];
    join_path(config_path, sizeof config_path, deck->run.output_dir, in->output);
    const char *dot = strrchr(config_path, '.'), *slash = strrchr(config_path, '/');
    int stem = dot && (!slash || dot > slash) ? (int)(dot - config_path) : (int)strlen(config_path);
    snprintf(svg_path, sizeof svg_path, "%.*s.svg", stem, config_path);
    join_path(names_path, sizeof names_path, deck->run.output_dir, "trainable_tensors.txt");
    parent_of(config_path, dir, sizeof dir);
    if (make_directories(deck->run.output_dir) != 0 || make_directories(dir) != 0) {
        snprintf(err, err_size, "cannot create %s: %s", dir, strerror(errno));
        goto done;
    }
    struct select_source *sources = xcalloc((size_t)n_stats, sizeof *sources);
    for (int i = 0; i < n_stats; i++) {
        uint64_t sum = 0;
        if (checksum_file(paths[i], &sum, err, err_size) != 0) {
            free(sources);
            goto done;
        }
        sources[i] = (struct select_source){.path = paths[i],
                                            .config_hash = stats[i].config_hash,
                                            .tokens = stats[i].tokens[0],
                                            .stats = &stats[i]};
        snprintf(sources[i].checksum, sizeof sources[i].checksum, "%016" PRIx64, sum);
    }
    struct select_report report = {.score_function = in->score_function,
                                   .top_p = in->top_p,
                                   .union_tasks = in->union_tasks,
                                   .shared_experts = in->train_shared_experts,
                                   .non_expert_modules = in->train_non_expert_modules,
                                   .model_path = model_path ? model_path : stats[0].model_path,
                                   .n_sources = n_stats,
                                   .sources = sources,
                                   .stability = have_stability ? &stability : NULL,
                                   .tasks = have_tasks ? &tasks : NULL};
    int rc = select_write_config(config_path, &selection, &report, err, err_size);
    if (rc == 0) rc = select_write_svg(svg_path, &selection, &report, err, err_size);
    char stability_svg[4400] = "";
    if (have_stability) snprintf(stability_svg, sizeof stability_svg, "%.*s_stability.svg", stem,
                                 config_path);
    if (rc == 0 && have_stability)
        rc = stability_write_svg(stability_svg, &stability, &selection, report.model_path, err,
                                 err_size);
    char tasks_svg[4400] = "";
    if (have_tasks) snprintf(tasks_svg, sizeof tasks_svg, "%.*s_tasks.svg", stem, config_path);
    if (rc == 0 && have_tasks) rc = overlap_write_svg(tasks_svg, &tasks, err, err_size);
    if (rc == 0) rc = select_write_names(names_path, names, n_names, err, err_size);
    char c2r_path[4200] = "";
    if (rc == 0 && in->c2r_top_t > 0) {
        join_path(c2r_path, sizeof c2r_path, deck->run.output_dir, C2R_CONFIG_NAME);
        rc = c2r_write_config(c2r_path, report.model_path, views, paths, n_stats, in->c2r_top_t,
                              err, err_size);
    }
    free(sources);
    if (rc != 0) goto done;

    /* the summary */
    int E = selection.num_experts;
    log_info("select: %s score, top_p %g, %d statistics file%s%s, model %s",
             score_function_label(in->score_function), in->top_p, n_stats, n_stats == 1 ? "" : "s",
             n_stats > 1 ? (in->union_tasks ? " (union of tasks)" : " (summed)") : "",
             report.model_path);
    if (!have_model)
        log_info("select: model.path is not set: %s names the routed experts only, spelled "
                 "model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight (qwen, olmoe)%s",
                 names_path,
                 in->train_shared_experts || in->train_non_expert_modules
                     ? "; shared experts and non-expert tensors are not listed"
                     : "");
    log_info("select:  layer  chosen  cumulative  experts (by descending score)");
    for (int l = 0; l < selection.n_moe_layers; l++) {
        char ids[2048] = "";
        size_t used = 0;
        for (int i = 0; i < selection.n_chosen[l] && used + 8 < sizeof ids; i++)
            used += (size_t)snprintf(ids + used, sizeof ids - used, "%s%d", i ? " " : "",
                                     selection.chosen[(size_t)l * E + i]);
        log_info("select: %6d  %3d/%-3d  %10.4f  %s", (int)selection.moe_layers[l],
                 selection.n_chosen[l], E, selection.cumulative[l], ids);
    }
    if (have_stability) {
        int worst = 0;
        for (int l = 1; l < selection.n_moe_layers; l++)
            if (stability.layer_jaccard[l] < stability.layer_jaccard[worst]) worst = l;
        log_info("select: selection stability: mean Jaccard %.3f (layer min %.3f at layer %d) "
                 "over %d resamples of the %" PRIu64 " scored samples (%.1f s)",
                 stability.mean_jaccard, stability.layer_jaccard[worst],
                 (int)selection.moe_layers[worst], stability.resamples, stability.n_samples,
                 stability.seconds);
        for (int f = 0; f < STABILITY_FRACTIONS; f++)
            log_info("select:   %5.3f of the samples (%.0f tokens): mean Jaccard %.3f",
                     stability.fraction[f], stability.fraction_tokens[f],
                     stability.fraction_jaccard[f]);
        if (stability.tokens_needed >= 0)
            log_info("select: mean Jaccard %.3g reached with about %.0f scored tokens",
                     stability.target, stability.tokens_needed);
        else
            log_info("select: mean Jaccard %.3g not reached with the tokens scored: score more "
                     "(score.n_sample_tokens)", stability.target);
        log_info("select: stability picture -> %s", stability_svg);
    }
    if (have_tasks) {
        overlap_log(&tasks);
        log_info("select: tasks picture -> %s", tasks_svg);
    }
    if (c2r_path[0])
        log_info("select: C2R: each expert's top %d collaborators -> %s", in->c2r_top_t,
                 c2r_path);
    int chosen = select_count(&selection), total = selection.n_moe_layers * E;
    log_info("select: %d of %d experts (%.1f%%) -> %s, %s, %s (%d tensors)", chosen, total,
             100.0 * chosen / total, config_path, svg_path, names_path, n_names);
    metrics_write("select",
                  "\"score_function\": \"%s\", \"top_p\": %.17g, \"stats_files\": %d, "
                  "\"union_tasks\": %s, \"moe_layers\": %d, \"experts_chosen\": %d, "
                  "\"experts_total\": %d, \"trainable_tensors\": %d",
                  score_function_label(in->score_function), in->top_p, n_stats,
                  in->union_tasks ? "true" : "false", selection.n_moe_layers, chosen, total,
                  n_names);
    status = 0;

done:
    if (have_stability) stability_free(&stability);
    if (have_tasks) overlap_free(&tasks);
    select_free_names(names, n_names);
    if (have_model) model_free(&model);
    expert_selection_free(&selection);
    for (int i = 0; i < n_read; i++) stats_free(&stats[i]);
    free(views);
    free(stats);
    return status;
}

int phase_select(const struct deck *deck, const struct layout *layout)
{
    int status = 0;
    char *err = xcalloc(SELECT_ERR_MAX, 1);
    if (layout->world_rank == 0) status = select_on_rank0(deck, err, SELECT_ERR_MAX);
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status != 0) fatal_all(status, "select: %s", err);
    free(err);
    return 0;
}
