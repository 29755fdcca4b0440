/* sweep_summary: `esft --sweep summary DECK`, the results of every point of a sweep in
 * one table and one picture (see sweep.h), read back from what the points wrote:
 *
 *   metrics.jsonl  whether the point ran (its last `start` line), how it ended (`end`:
 *                  status), select's `select` line (experts chosen of all; the shared
 *                  run's when select is shared), train's `train` summary (trained and
 *                  total parameters, seconds and steps of its last run), and the
 *                  validation curve (history_read, the lineage of every resumed segment)
 *   eval.json      the eval phase's loss, perplexity and accuracy
 *
 * The picture is history.c's line chart: the best validation loss of each point against
 * the first swept key's values, one line per value of the second key (the best over the
 * other keys' values), or one line in zip mode. */
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

enum point_state { NOT_STARTED, RUNNING, DONE, STOPPED, FAILED };

struct result {
    enum point_state state;
    int exit_status;
    int experts_chosen, experts_total; /* -1: no select line */
    double trained, parameters;        /* 0: no train line */
    double final_loss, final_val, best_val, step_seconds;
    long long best_step;
    double eval_loss, eval_perplexity, eval_accuracy; /* NAN: no eval.json */
};

static double number(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
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
    while (getline(&line, &capacity, file) > 0) {
        json_t *o = json_loads(line, 0, NULL);
        const char *event = json_string_value(json_object_get(o, "event"));
        if (!event) {
        } else if (strcmp(event, "start") == 0) {
            r->state = RUNNING;
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
            double steps = number(o, "steps_this_run"), seconds = number(o, "seconds");
            r->step_seconds = steps > 0 ? seconds / steps : NAN;
            r->final_loss = number(o, "final_loss");
        }
        json_decref(o);
    }
    free(line);
    fclose(file);
}

static void read_point(const struct sweep *sw, int p, const struct result *shared, struct result *r)
{
    *r = (struct result){NOT_STARTED, 0, -1, -1, 0, 0, NAN, NAN, NAN, NAN, -1, NAN, NAN, NAN};
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
    curve_free(&train);
    curve_free(&val);
    char path[8500];
    snprintf(path, sizeof path, "%s/eval.json", dir);
    json_t *eval = json_load_file(path, 0, NULL);
    if (eval) {
        r->eval_loss = number(eval, "loss");
        r->eval_perplexity = number(eval, "perplexity");
        r->eval_accuracy = number(eval, "accuracy");
        json_decref(eval);
    }
}

static const char *state_text(const struct result *r, char *buf, size_t size)
{
    switch (r->state) {
    case NOT_STARTED:
        return "not started";
    case RUNNING:
        return "running"; /* or killed without a word: the table cannot tell */
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
                      bool best)
{
    const char *sep = csv ? "," : " | ";
    int index[SWEEP_MAX_KEYS];
    sweep_point_values(sw, p, index);
    char b[16][64], state[64], experts[64] = "", share[64] = "", best_val[96] = "";
    if (r->experts_chosen >= 0)
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
    fprintf(out, "%s%s%s%s%s%s%s%s", sep, share, sep, cell(r->final_loss, 6, b[0], 64), sep,
            cell(r->final_val, 6, b[1], 64), sep, best_val);
    if (csv)
        fprintf(out, "%s%s", sep,
                r->best_step >= 0 ? cell((double)r->best_step, 12, b[2], 64) : "");
    fprintf(out, "%s%s%s%s%s%s%s%s%s\n", sep, cell(r->eval_loss, 6, b[3], 64), sep,
            cell(r->eval_perplexity, 6, b[4], 64), sep, cell(r->eval_accuracy, 4, b[5], 64), sep,
            cell(r->step_seconds, 3, b[6], 64), csv ? "" : " |");
}

static void write_table(FILE *out, bool csv, const struct sweep *sw, const struct result *results,
                        int best)
{
    const char *sep = csv ? "," : " | ";
    fprintf(out, "%spoint%sname", csv ? "" : "| ", sep);
    for (int k = 0; k < sw->n_keys; k++) fprintf(out, "%s%s", sep, sw->keys[k].path);
    if (csv)
        fputs(",status,experts_chosen,experts_total,trained_share,final_loss,final_val_loss,"
              "best_val_loss,best_val_step,eval_loss,eval_perplexity,eval_accuracy,"
              "step_seconds\n",
              out);
    else
        fputs(" | status | experts | trained | final loss | final val loss | best val loss | "
              "eval loss | eval ppl | eval acc | step (s) |\n",
              out);
    if (!csv) {
        fputs("|---|---|", out);
        for (int k = 0; k < sw->n_keys; k++) fputs("---|", out);
        fputs("---|---|---|---|---|---|---|---|---|---|\n", out);
    }
    for (int p = 0; p < sw->n_points; p++) write_row(out, csv, sw, p, &results[p], p == best);
}

struct table_context {
    const struct sweep *sw;
    const struct result *results;
    int best;
    bool csv;
};

static void table_body(FILE *out, const void *context)
{
    const struct table_context *t = context;
    write_table(out, t->csv, t->sw, t->results, t->best);
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

int sweep_summary(const struct sweep *sw, FILE *out, char *err, size_t err_size)
{
    /* the shared run's directory: select's line when select ran once for all */
    struct result shared = {.state = NOT_STARTED, .experts_chosen = -1, .experts_total = -1};
    bool seen;
    read_metrics(sw->base_dir, &shared, &seen);
    struct result *results = xcalloc((size_t)sw->n_points, sizeof *results);
    bool validated = false;
    for (int p = 0; p < sw->n_points; p++) {
        read_point(sw, p, &shared, &results[p]);
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
        free(results);
        return -1;
    }
    struct table_context table = {sw, results, best, false};
    snprintf(path, sizeof path, "%s/summary.md", dir);
    int status = file_write_atomically(path, table_body, &table, err, err_size);
    table.csv = true;
    snprintf(path, sizeof path, "%s/summary.csv", dir);
    if (status == 0) status = file_write_atomically(path, table_body, &table, err, err_size);
    snprintf(path, sizeof path, "%s/summary.svg", dir);
    if (status == 0) status = write_picture(sw, results, validated, path, err, err_size);

    if (status == 0) {
        int counts[FAILED + 1] = {0};
        for (int p = 0; p < sw->n_points; p++) counts[results[p].state]++;
        fprintf(out,
                "# Sweep of %s: %d points (%d done, %d running, %d stopped, %d failed, %d "
                "not started)\n\n",
                sw->file, sw->n_points, counts[DONE], counts[RUNNING], counts[STOPPED],
                counts[FAILED], counts[NOT_STARTED]);
        if (sw->n_shared > 0) {
            char state[64];
            fprintf(out, "shared phases (");
            for (int i = 0; i < sw->n_shared; i++)
                fprintf(out, "%s%s", i ? ", " : "", phase_name(sw->shared[i]));
            fprintf(out, ") in %s: %s\n\n", sw->base_dir, state_text(&shared, state, sizeof state));
        }
        write_table(out, false, sw, results, best);
        if (best >= 0)
            fprintf(out, "\nbest: point %d, %s (%s %.6g)\n", best, sw->names[best],
                    validated ? "best validation loss" : "final training loss",
                    rank_value(&results[best], validated));
        else
            fprintf(out, "\nbest: none yet (no point has a %s)\n",
                    validated ? "validation loss" : "training loss");
        fprintf(out, "table: %s/summary.md, %s/summary.csv; picture: %s/summary.svg\n", dir, dir,
                dir);
    }
    free(results);
    return status;
}
