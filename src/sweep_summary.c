/* sweep_summary: `esft --sweep summary DECK`, the results of every point of a sweep in
 * one table and one picture (see sweep.h), read back from what the points wrote:
 *
 *   metrics.jsonl  whether the point ran (its last `start` line, with the host, pid and
 *                  pid start time of its process), how it ended (`end`: status; a start
 *                  without an end whose process is gone from this host: failed),
 *                  select's `select` line (experts chosen of all; the shared run's when
 *                  select is shared), train's `train` summary (trained and total
 *                  parameters, optimizer bytes), the step time (the median interval of
 *                  the last segment's `step` lines), and the training and validation
 *                  curves (history_read, the lineage of every resumed segment)
 *   eval.json      the eval phase's loss, perplexity and accuracy, and its extra
 *                  datasets' losses (a column each, by file name)
 *
 * The pictures are history.c's line charts: summary.svg, the best validation loss of
 * each point against the first swept key's values, one line per value of the second key
 * (the best over the other keys' values), or one line in zip mode; curves.svg, each
 * point's training loss per step. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files.h"
#include "history.h"
#include "log.h"
#include "sweep.h"

#define SUMMARY_MAX_EXTRA 8 /* extra datasets with a column of their own */
#define SUMMARY_MAX_CURVES 32 /* points whose curves the picture draws */

/* GONE: a start without an end whose process, on this host, is no longer there (killed,
 * or its node lost): failed, though it could not say so. */
enum point_state { NOT_STARTED, RUNNING, DONE, STOPPED, FAILED, GONE };

struct result {
    enum point_state state;
    int exit_status;
    char host[256]; /* of the last start line ("" when it names none) */
    long pid;
    unsigned long long pid_start;
    int experts_chosen, experts_total; /* -1: no select line */
    double trained, parameters;        /* 0: no train line */
    double optimizer_bytes;            /* NAN: not in the train line */
    bool trains_experts; /* method esft (or not known): select's choice is what trains */
    double final_loss, final_val, best_val, step_seconds;
    long long best_step;
    double eval_loss, eval_perplexity, eval_accuracy; /* NAN: no eval.json */
    double extra_loss[SUMMARY_MAX_EXTRA]; /* eval.json's extra datasets, by column */
    struct curve train;                   /* the training loss per step */
};

/* The extra datasets' columns: the names (file names) met in the points' eval.json. */
struct extra_columns {
    char names[SUMMARY_MAX_EXTRA][256];
    int n;
};

static double number(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

/* Whether the process of a run's last start line, which has no end line, is no longer
 * there: it ran on this host and no process of its pid is there, or one that started at
 * another time (the pid was reused). On another host (or with a start line that names
 * none) it cannot be told from here: false. */
static bool process_gone(const struct result *r)
{
    char host[256];
    host_name(host, sizeof host);
    if (!r->host[0] || r->pid <= 0 || strcmp(host, r->host) != 0) return false;
    unsigned long long ticks = 0;
    if (process_start_ticks(r->pid, &ticks) != 0) return true;
    return r->pid_start != 0 && ticks != r->pid_start;
}

static void free_results(struct result *results, int n)
{
    for (int p = 0; p < n; p++) curve_free(&results[p].train);
    free(results);
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The lines of DIR/metrics.jsonl that the table needs. A missing file leaves r as it is. */
static void read_metrics(const char *dir, struct result *r, bool *seen)
{
    char path[8400];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *file = fopen(path, "r");
    *seen = file != NULL;
    if (!file) return;
    char *line = NULL;
    size_t capacity = 0;
    /* the intervals between the step lines of the last training segment */
    double *intervals = NULL, previous = NAN;
    size_t n_intervals = 0, intervals_capacity = 0;
    while (getline(&line, &capacity, file) > 0) {
        json_t *o = json_loads(line, 0, NULL);
        const char *event = json_string_value(json_object_get(o, "event"));
        if (!event) {
        } else if (strcmp(event, "start") == 0) {
            r->state = RUNNING;
            const char *host = json_string_value(json_object_get(o, "host"));
            snprintf(r->host, sizeof r->host, "%s", host ? host : "");
            double pid = number(o, "pid"), pid_start = number(o, "pid_start");
            r->pid = isfinite(pid) ? (long)pid : 0;
            r->pid_start = isfinite(pid_start) ? (unsigned long long)pid_start : 0;
        } else if (strcmp(event, "end") == 0) {
            r->exit_status = (int)number(o, "status");
            r->state = r->exit_status == 0              ? DONE
                       : r->exit_status == EXIT_STOPPED ? STOPPED
                                                        : FAILED;
        } else if (strcmp(event, "select") == 0) {
            r->experts_chosen = (int)number(o, "experts_chosen");
            r->experts_total = (int)number(o, "experts_total");
        } else if (strcmp(event, "train") == 0) {
            r->trained = number(o, "trainable_parameters");
            r->parameters = number(o, "parameters");
            r->optimizer_bytes = number(o, "optimizer_bytes");
            const char *method = json_string_value(json_object_get(o, "method"));
            r->trains_experts = !method || strcmp(method, "esft") == 0;
            double steps = number(o, "steps_this_run"), seconds = number(o, "seconds");
            r->step_seconds = steps > 0 ? seconds / steps : NAN;
            r->final_loss = number(o, "final_loss");
        } else if (strcmp(event, "train_start") == 0) {
            n_intervals = 0, previous = NAN;
        } else if (strcmp(event, "step") == 0) {
            double time = number(o, "time");
            if (isfinite(previous) && isfinite(time)) {
                if (n_intervals == intervals_capacity) {
                    intervals_capacity = intervals_capacity ? 2 * intervals_capacity : 64;
                    intervals = realloc(intervals, intervals_capacity * sizeof *intervals);
                    if (!intervals) fatal(EXIT_RUNTIME, "out of memory (step times)");
                }
                intervals[n_intervals++] = time - previous;
            }
            previous = time;
        }
        json_decref(o);
    }
    free(line);
    fclose(file);
    if (r->state == RUNNING && process_gone(r)) r->state = GONE;
    /* the step time: the median interval between step lines (validation passes and the
     * export fall between a few of them), else the train line's seconds per step */
    if (n_intervals > 0) {
        qsort(intervals, n_intervals, sizeof *intervals, compare_doubles);
        r->step_seconds = n_intervals % 2 ? intervals[n_intervals / 2]
                                          : 0.5 * (intervals[n_intervals / 2 - 1] +
                                                   intervals[n_intervals / 2]);
    }
    free(intervals);
}

static void read_point(const struct sweep *sw, int p, const struct result *shared,
                       struct extra_columns *columns, struct result *r)
{
    *r = (struct result){.state = NOT_STARTED, .experts_chosen = -1, .experts_total = -1,
                         .final_loss = NAN, .final_val = NAN, .best_val = NAN,
                         .step_seconds = NAN, .best_step = -1, .eval_loss = NAN,
                         .eval_perplexity = NAN, .eval_accuracy = NAN,
                         .optimizer_bytes = NAN, .trains_experts = true};
    for (int i = 0; i < SUMMARY_MAX_EXTRA; i++) r->extra_loss[i] = NAN;
    char dir[8400];
    sweep_point_dir(sw, p, dir, sizeof dir);
    bool seen;
    read_metrics(dir, r, &seen);
    if (r->experts_chosen < 0) { /* select ran once for every point */
        r->experts_chosen = shared->experts_chosen;
        r->experts_total = shared->experts_total;
    }
    struct curve train = {0}, val = {0};
    char err[512];
    if (seen && history_read(dir, &train, &val, err, sizeof err) == 0) {
        if (train.n > 0 && !isfinite(r->final_loss)) r->final_loss = train.loss[train.n - 1];
        if (val.n > 0) r->final_val = val.loss[val.n - 1];
        for (int i = 0; i < val.n; i++)
            if (!(val.loss[i] >= r->best_val))
                r->best_val = val.loss[i], r->best_step = val.step[i];
    }
    r->train = train; /* for the curves' picture */
    curve_free(&val);
    char path[8500];
    snprintf(path, sizeof path, "%s/eval.json", dir);
    json_t *eval = json_load_file(path, 0, NULL);
    if (eval) {
        r->eval_loss = number(eval, "loss");
        r->eval_perplexity = number(eval, "perplexity");
        r->eval_accuracy = number(eval, "accuracy");
        size_t i;
        json_t *extra;
        json_array_foreach(json_object_get(eval, "extra"), i, extra) {
            const char *dataset = json_string_value(json_object_get(extra, "dataset"));
            if (!dataset) continue;
            const char *name = strrchr(dataset, '/');
            name = name ? name + 1 : dataset;
            int c = 0;
            while (c < columns->n && strcmp(columns->names[c], name) != 0) c++;
            if (c == columns->n && columns->n < SUMMARY_MAX_EXTRA)
                snprintf(columns->names[columns->n++], sizeof columns->names[0], "%s", name);
            if (c < columns->n) r->extra_loss[c] = number(extra, "loss");
        }
        json_decref(eval);
    }
}

static const char *state_text(const struct result *r, char *buf, size_t size)
{
    switch (r->state) {
    case NOT_STARTED:
        return "not started";
    case RUNNING:
        if (!r->host[0]) return "running";
        snprintf(buf, size, "running (pid %ld on %s)", r->pid, r->host);
        return buf;
    case GONE:
        snprintf(buf, size, "failed (no end; pid %ld on %s is gone)", r->pid, r->host);
        return buf;
    case DONE:
        return "done";
    case STOPPED:
        return "stopped (resumable)";
    case FAILED:
        snprintf(buf, size, "failed (status %d)", r->exit_status);
        return buf;
    }
    return "?";
}

/* A number for the table: %.*g, or "" when not known. */
static const char *cell(double v, int digits, char *buf, size_t size)
{
    if (!isfinite(v)) return "";
    snprintf(buf, size, "%.*g", digits, v);
    return buf;
}

/* What a point is ranked by: its best validation loss, else its final training loss
 * when no point validated. */
static double rank_value(const struct result *r, bool validated)
{
    return validated ? r->best_val : r->final_loss;
}

/* One row, in markdown (| separated) or CSV. */
static void write_row(FILE *out, bool csv, const struct sweep *sw, int p, const struct result *r,
                      const struct extra_columns *columns, bool best)
{
    const char *sep = csv ? "," : " | ";
    int index[SWEEP_MAX_KEYS];
    sweep_point_values(sw, p, index);
    char b[16][64], state[400], experts[64] = "", share[64] = "", best_val[96] = "";
    if (r->experts_chosen >= 0 && r->trains_experts)
        snprintf(experts, sizeof experts, csv ? "%d" : "%d of %d", r->experts_chosen,
                 r->experts_total);
    if (r->parameters > 0)
        snprintf(share, sizeof share, csv ? "%.6g" : "%.2f%%",
                 (csv ? 1.0 : 100.0) * r->trained / r->parameters);
    if (isfinite(r->best_val))
        snprintf(best_val, sizeof best_val, csv ? "%.6g" : "%.6g (step %lld)", r->best_val,
                 r->best_step);
    fprintf(out, "%s%d%s%s%s", csv ? "" : "| ", p, sep, sw->names[p],
            best && !csv ? " **best**" : "");
    for (int k = 0; k < sw->n_keys; k++) {
        const char *v = sw->keys[k].values[index[k]];
        if (csv && strpbrk(v, ",\"\n")) { /* RFC 4180 quoting */
            fputs(",\"", out);
            for (const char *c = v; *c; c++) fprintf(out, *c == '"' ? "\"\"" : "%c", *c);
            fputc('"', out);
        } else {
            fprintf(out, "%s%s", sep, v);
        }
    }
    fprintf(out, "%s%s%s%s", sep, state_text(r, state, sizeof state), sep, experts);
    if (csv) fprintf(out, "%s%d", sep, r->experts_total);
    fprintf(out, "%s%s%s%s%s%s", sep, share, sep, r->parameters > 0 ? cell(r->trained, 15, b[7], 64) : "",
            sep, cell(r->optimizer_bytes, 15, b[8], 64));
    fprintf(out, "%s%s%s%s%s%s", sep, cell(r->final_loss, 6, b[0], 64), sep,
            cell(r->final_val, 6, b[1], 64), sep, best_val);
    if (csv)
        fprintf(out, "%s%s", sep,
                r->best_step >= 0 ? cell((double)r->best_step, 12, b[2], 64) : "");
    fprintf(out, "%s%s%s%s%s%s", sep, cell(r->eval_loss, 6, b[3], 64), sep,
            cell(r->eval_perplexity, 6, b[4], 64), sep, cell(r->eval_accuracy, 4, b[5], 64));
    for (int c = 0; c < columns->n; c++) fprintf(out, "%s%s", sep, cell(r->extra_loss[c], 6, b[9], 64));
    fprintf(out, "%s%s%s\n", sep, cell(r->step_seconds, 3, b[6], 64), csv ? "" : " |");
}

static void write_table(FILE *out, bool csv, const struct sweep *sw, const struct result *results,
                        const struct extra_columns *columns, int best)
{
    const char *sep = csv ? "," : " | ";
    fprintf(out, "%spoint%sname", csv ? "" : "| ", sep);
    for (int k = 0; k < sw->n_keys; k++) fprintf(out, "%s%s", sep, sw->keys[k].path);
    if (csv)
        fputs(",status,experts_chosen,experts_total,trained_share,trained_parameters,"
              "optimizer_bytes,final_loss,final_val_loss,best_val_loss,best_val_step,eval_loss,"
              "eval_perplexity,eval_accuracy",
              out);
    else
        fputs(" | status | experts | trained | trained params | optimizer bytes | final loss | "
              "final val loss | best val loss | eval loss | eval ppl | eval acc",
              out);
    for (int c = 0; c < columns->n; c++)
        fprintf(out, csv ? ",eval_loss_%s" : " | eval loss %s", columns->names[c]);
    fputs(csv ? ",step_seconds\n" : " | step (s) |\n", out);
    if (!csv) {
        fputs("|---|---|", out);
        for (int k = 0; k < sw->n_keys + 12 + columns->n; k++) fputs("---|", out);
        fputc('\n', out);
    }
    for (int p = 0; p < sw->n_points; p++)
        write_row(out, csv, sw, p, &results[p], columns, p == best);
}

struct table_context {
    const struct sweep *sw;
    const struct result *results;
    const struct extra_columns *columns;
    int best;
    bool csv;
};

static void table_body(FILE *out, const void *context)
{
    const struct table_context *t = context;
    write_table(out, t->csv, t->sw, t->results, t->columns, t->best);
}

/* Whether every value of key k reads whole as a finite number. */
static bool numeric_key(const struct sweep_key *key, double *values)
{
    for (int v = 0; v < key->n_values; v++) {
        char *end;
        errno = 0;
        values[v] = strtod(key->values[v], &end);
        if (*end || end == key->values[v] || errno || !isfinite(values[v])) return false;
    }
    return true;
}

static int write_picture(const struct sweep *sw, const struct result *results, bool validated,
                         const char *path, char *err, size_t err_size)
{
    const struct sweep_key *first = &sw->keys[0];
    int n_x = first->n_values;
    bool grid2 = sw->mode == SWEEP_GRID && sw->n_keys >= 2;
    int n_series = grid2 ? sw->keys[1].n_values : 1;
    /* x positions in value order: numbers sorted, else the deck's order as categories */
    double value[SWEEP_MAX_VALUES];
    bool numeric = numeric_key(first, value);
    int order[SWEEP_MAX_VALUES];
    for (int v = 0; v < n_x; v++) order[v] = v;
    for (int i = 1; numeric && i < n_x; i++)
        for (int j = i; j > 0 && value[order[j]] < value[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    double *x = xcalloc((size_t)n_x, sizeof *x);
    double *y = xcalloc((size_t)n_series * (size_t)n_x, sizeof *y);
    for (int i = 0; i < n_x; i++) x[i] = numeric ? value[order[i]] : i;
    for (int i = 0; i < n_series * n_x; i++) y[i] = NAN;
    for (int p = 0; p < sw->n_points; p++) {
        int index[SWEEP_MAX_KEYS];
        sweep_point_values(sw, p, index);
        int s = grid2 ? index[1] : 0, i = 0;
        while (order[i] != index[0]) i++;
        double v = rank_value(&results[p], validated);
        if (isfinite(v) && !(y[s * n_x + i] <= v)) y[s * n_x + i] = v; /* the best of the rest */
    }
    struct plot_series series[SWEEP_MAX_VALUES];
    char labels[SWEEP_MAX_VALUES][160];
    for (int s = 0; s < n_series; s++) {
        if (grid2)
            snprintf(labels[s], sizeof labels[s], "%s = %s", sw->keys[1].path,
                     sw->keys[1].values[s]);
        else
            snprintf(labels[s], sizeof labels[s], "%s",
                     validated ? "best validation loss" : "final training loss");
        series[s] = (struct plot_series){labels[s], x, y + (size_t)s * n_x, n_x, true};
    }
    const char *x_labels[SWEEP_MAX_VALUES];
    for (int i = 0; i < n_x; i++) x_labels[i] = first->values[i];
    char title[512];
    snprintf(title, sizeof title, "Sweep %s: %s%s", sw->file,
             validated ? "best validation loss" : "final training loss",
             sw->n_keys > 2 && grid2 ? " (best over the other keys)" : "");
    struct plot plot = {.title = title,
                        .x_label = first->path,
                        .y_label = validated ? "best validation loss" : "final training loss",
                        .x_labels = numeric ? NULL : x_labels,
                        .n_x_labels = numeric ? 0 : n_x,
                        .series = series,
                        .n_series = n_series};
    int status = plot_lines(path, &plot, err, err_size);
    free(x);
    free(y);
    return status;
}

/* The training loss per step of every point (the first SUMMARY_MAX_CURVES), one line
 * each, named by the point: the methods' or values' curves side by side. */
static int write_curves(const struct sweep *sw, const struct result *results, const char *path,
                        char *err, size_t err_size)
{
    int n = sw->n_points < SUMMARY_MAX_CURVES ? sw->n_points : SUMMARY_MAX_CURVES;
    struct plot_series *series = xcalloc((size_t)n, sizeof *series);
    double *x = NULL;
    size_t total = 0;
    for (int p = 0; p < n; p++) total += (size_t)results[p].train.n;
    x = xcalloc(total ? total : 1, sizeof *x);
    size_t used = 0;
    int drawn = 0;
    for (int p = 0; p < n; p++) {
        const struct curve *c = &results[p].train;
        if (c->n == 0) continue;
        for (int i = 0; i < c->n; i++) x[used + (size_t)i] = (double)c->step[i];
        series[drawn++] = (struct plot_series){sw->names[p], x + used, c->loss, c->n, false};
        used += (size_t)c->n;
    }
    char title[512];
    snprintf(title, sizeof title, "Sweep %s: training loss%s", sw->file,
             sw->n_points > n ? " (the first points)" : "");
    struct plot plot = {.title = title,
                        .x_label = "step",
                        .y_label = "training loss",
                        .integral_x = true,
                        .series = series,
                        .n_series = drawn};
    int status = plot_lines(path, &plot, err, err_size);
    free(series);
    free(x);
    return status;
}

int sweep_summary(const struct sweep *sw, FILE *out, char *err, size_t err_size)
{
    /* the shared run's directory: select's line when select ran once for all */
    struct result shared = {.state = NOT_STARTED, .experts_chosen = -1, .experts_total = -1};
    bool seen;
    read_metrics(sw->base_dir, &shared, &seen);
    struct result *results = xcalloc((size_t)sw->n_points, sizeof *results);
    bool validated = false;
    struct extra_columns columns = {.n = 0};
    for (int p = 0; p < sw->n_points; p++) {
        read_point(sw, p, &shared, &columns, &results[p]);
        validated |= isfinite(results[p].best_val);
    }
    /* the best point: among those done, else among any with a value */
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; pass++)
        for (int p = 0; p < sw->n_points; p++) {
            double v = rank_value(&results[p], validated);
            if (!isfinite(v) || (pass == 0 && results[p].state != DONE)) continue;
            if (best < 0 || v < rank_value(&results[best], validated)) best = p;
        }

    char dir[8400], path[8500];
    snprintf(dir, sizeof dir, "%s/sweep", sw->base_dir);
    if (make_directories(dir) != 0) {
        snprintf(err, err_size, "%s: cannot create: %s", dir, strerror(errno));
        free_results(results, sw->n_points);
        return -1;
    }
    struct table_context table = {sw, results, &columns, best, false};
    snprintf(path, sizeof path, "%s/summary.md", dir);
    int status = file_write_atomically(path, table_body, &table, err, err_size);
    table.csv = true;
    snprintf(path, sizeof path, "%s/summary.csv", dir);
    if (status == 0) status = file_write_atomically(path, table_body, &table, err, err_size);
    snprintf(path, sizeof path, "%s/summary.svg", dir);
    if (status == 0) status = write_picture(sw, results, validated, path, err, err_size);
    snprintf(path, sizeof path, "%s/curves.svg", dir);
    if (status == 0) status = write_curves(sw, results, path, err, err_size);

    if (status == 0) {
        int counts[GONE + 1] = {0};
        for (int p = 0; p < sw->n_points; p++) counts[results[p].state]++;
        counts[FAILED] += counts[GONE];
        fprintf(out,
                "# Sweep of %s: %d points (%d done, %d running, %d stopped, %d failed, %d "
                "not started)\n\n",
                sw->file, sw->n_points, counts[DONE], counts[RUNNING], counts[STOPPED],
                counts[FAILED], counts[NOT_STARTED]);
        if (sw->n_shared > 0) {
            char state[400];
            fprintf(out, "shared phases (");
            for (int i = 0; i < sw->n_shared; i++)
                fprintf(out, "%s%s", i ? ", " : "", phase_name(sw->shared[i]));
            fprintf(out, ") in %s: %s\n\n", sw->base_dir, state_text(&shared, state, sizeof state));
        }
        write_table(out, false, sw, results, &columns, best);
        if (best >= 0)
            fprintf(out, "\nbest: point %d, %s (%s %.6g)\n", best, sw->names[best],
                    validated ? "best validation loss" : "final training loss",
                    rank_value(&results[best], validated));
        else
            fprintf(out, "\nbest: none yet (no point has a %s)\n",
                    validated ? "validation loss" : "training loss");
        fprintf(out,
                "table: %s/summary.md, %s/summary.csv; pictures: %s/summary.svg, "
                "%s/curves.svg\n",
                dir, dir, dir, dir);
    }
    free_results(results, sw->n_points);
    return status;
}
