/* history: the training history of an output directory (see history.h). */
#include "history.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files.h"
#include "log.h"

void curve_add(struct curve *c, long long step, double loss)
{
    if (c->n == c->capacity) {
        c->capacity = c->capacity ? 2 * c->capacity : 64;
        c->step = realloc(c->step, (size_t)c->capacity * sizeof *c->step);
        c->loss = realloc(c->loss, (size_t)c->capacity * sizeof *c->loss);
        if (!c->step || !c->loss) fatal(EXIT_RUNTIME, "out of memory (loss curve)");
    }
    c->step[c->n] = step;
    c->loss[c->n++] = loss;
}

void curve_cut_after(struct curve *c, long long step)
{
    while (c->n > 0 && c->step[c->n - 1] > step) c->n--;
}

void curve_free(struct curve *c)
{
    free(c->step);
    free(c->loss);
    memset(c, 0, sizeof *c);
}

int history_read(const char *output_dir, struct curve *train, struct curve *eval, char *err,
                 size_t err_size)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", output_dir);
    FILE *file = fopen(path, "r");
    if (!file) {
        if (errno == ENOENT) return 0;
        snprintf(err, err_size, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t capacity = 0;
    long long number = 0;
    int status = 0;
    while (getline(&line, &capacity, file) > 0) {
        number++;
        json_error_t error;
        json_t *o = json_loads(line, 0, &error);
        if (!json_is_object(o)) {
            /* a line cut by a crash mid-write is the only way to get one: skip it */
            json_decref(o);
            continue;
        }
        const char *event = json_string_value(json_object_get(o, "event"));
        json_t *step = json_object_get(o, "step"), *loss = json_object_get(o, "loss");
        if (!event) {
        } else if (strcmp(event, "train_start") == 0) {
            json_t *from = json_object_get(o, "from_step");
            if (!json_is_integer(from)) {
                snprintf(err, err_size, "%s:%lld: train_start without an integer from_step", path,
                         number);
                status = -1;
                json_decref(o);
                break;
            }
            /* a fresh start (step 0) drops everything, its own step-0 evaluation
             * included; a resume keeps what led to its checkpoint */
            long long k = json_integer_value(from);
            curve_cut_after(train, k > 0 ? k : -1);
            curve_cut_after(eval, k > 0 ? k : -1);
        } else if ((strcmp(event, "step") == 0 || strcmp(event, "eval") == 0) &&
                   json_is_integer(step)) {
            struct curve *c = event[0] == 's' ? train : eval;
            long long s = json_integer_value(step);
            curve_cut_after(c, s - 1);
            if (json_is_number(loss)) curve_add(c, s, json_number_value(loss));
        }
        json_decref(o);
    }
    free(line);
    fclose(file);
    return status;
}

/* ---- loss curve ------------------------------------------------------------------------- */

/* A "nice" tick spacing (1, 2 or 5 x 10^k) giving about `target` intervals over span. */
static double tick_spacing(double span, int target)
{
    double raw = span / target;
    double magnitude = pow(10.0, floor(log10(raw)));
    double fraction = raw / magnitude;
    double nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
    return nice * magnitude;
}

/* [lo, hi] widened to whole ticks; a single value gets a range around it. */
static void axis_range(double *lo, double *hi, double *spacing, bool integral)
{
    if (!(*hi > *lo)) {
        double pad = fabs(*lo) * 0.05;
        if (pad < (integral ? 1.0 : 1e-3)) pad = integral ? 1.0 : 0.5;
        *lo -= pad;
        *hi += pad;
    }
    *spacing = tick_spacing(*hi - *lo, 5);
    if (integral && *spacing < 1) *spacing = 1;
    *lo = floor(*lo / *spacing) * *spacing;
    *hi = ceil(*hi / *spacing) * *spacing;
}

/* Series colours: the loss chart's training (blue) and validation (red) first. */
static const char *const palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                      "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
#define N_COLOURS ((int)(sizeof palette / sizeof palette[0]))

static void chart_body(FILE *out, const struct plot *c)
{
    const int width = 760, height = 460, left = 72, right = 24, top = 56, bottom = 56;
    const int plot_w = width - left - right, plot_h = height - top - bottom;
    bool categorical = c->n_x_labels > 0;
    /* data ranges over every series, finite values only */
    double x_lo = INFINITY, x_hi = -INFINITY, y_lo = INFINITY, y_hi = -INFINITY;
    for (int s = 0; s < c->n_series; s++) {
        const struct plot_series *series = &c->series[s];
        for (int i = 0; i < series->n; i++) {
            if (!isfinite(series->y[i]) || !isfinite(series->x[i])) continue;
            x_lo = fmin(x_lo, series->x[i]);
            x_hi = fmax(x_hi, series->x[i]);
            y_lo = fmin(y_lo, series->y[i]);
            y_hi = fmax(y_hi, series->y[i]);
        }
    }
    if (categorical) { /* the categories at 0 .. n-1, half a slot of margin either side */
        x_lo = -0.5;
        x_hi = c->n_x_labels - 0.5;
    } else if (x_lo > x_hi) { /* nothing to draw: an empty unit chart */
        x_lo = 0;
        x_hi = 1;
    }
    if (y_lo > y_hi) {
        y_lo = 0;
        y_hi = 1;
    }
    double x_tick = 1, y_tick;
    if (!categorical) axis_range(&x_lo, &x_hi, &x_tick, c->integral_x);
    axis_range(&y_lo, &y_hi, &y_tick, false);
#define X_OF(v) (left + ((v)-x_lo) / (x_hi - x_lo) * plot_w)
#define Y_OF(v) (top + plot_h - ((v)-y_lo) / (y_hi - y_lo) * plot_h)

    svg_begin(out, width, height);
    fprintf(out, "<text x=\"%d\" y=\"28\" font-size=\"16\" font-weight=\"bold\">", left);
    xml_write_text(out, c->title && c->title[0] ? c->title : "Training loss");
    fputs("</text>\n", out);

    /* grid lines and ticks */
    fputs("<g font-size=\"10\" stroke-width=\"1\">\n", out);
    for (int i = 0; i <= 40; i++) { /* about 5 ticks; the bound only guards the loop */
        double v = y_lo + i * y_tick;
        if (v > y_hi + y_tick * 1e-6) break;
        double y = Y_OF(v);
        fprintf(out,
                "<line x1=\"%d\" y1=\"%.2f\" x2=\"%d\" y2=\"%.2f\" stroke=\"#e4e4e4\"/>\n"
                "<line x1=\"%d\" y1=\"%.2f\" x2=\"%d\" y2=\"%.2f\" stroke=\"#444\"/>\n"
                "<text x=\"%d\" y=\"%.2f\" text-anchor=\"end\" dominant-baseline=\"central\">"
                "%.4g</text>\n",
                left, y, left + plot_w, y, left - 4, y, left, y, left - 7, y,
                fabs(v) < y_tick * 1e-6 ? 0.0 : v);
    }
    int n_x_ticks = categorical ? c->n_x_labels : 41;
    for (int i = 0; i < n_x_ticks; i++) {
        double v = categorical ? i : x_lo + i * x_tick;
        if (!categorical && v > x_hi + x_tick * 1e-6) break;
        double x = X_OF(v);
        fprintf(out,
                "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#e4e4e4\"/>\n"
                "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#444\"/>\n"
                "<text x=\"%.2f\" y=\"%d\" text-anchor=\"middle\">",
                x, top, x, top + plot_h, x, top + plot_h, x, top + plot_h + 4, x, top + plot_h + 16);
        if (categorical)
            xml_write_text(out, c->x_labels[i]);
        else
            fprintf(out, "%.10g", v);
        fputs("</text>\n", out);
    }
    fputs("</g>\n", out);
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#444\"/>\n",
            left, top, plot_w, plot_h);
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">",
            left + plot_w / 2, height - 16);
    xml_write_text(out, c->x_label ? c->x_label : "step");
    fprintf(out,
            "</text>\n<text x=\"18\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\" "
            "transform=\"rotate(-90 18 %d)\">",
            top + plot_h / 2, top + plot_h / 2);
    xml_write_text(out, c->y_label ? c->y_label : "loss");
    fputs("</text>\n", out);

    /* each series: one polyline; its points as dots when asked (with their values on
     * hover), and a lone point always (a polyline of one vertex draws nothing) */
    for (int s = 0; s < c->n_series; s++) {
        const struct plot_series *series = &c->series[s];
        const char *colour = palette[s % N_COLOURS];
        fprintf(out, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"",
                colour);
        int drawn = 0;
        for (int i = 0; i < series->n; i++) {
            if (!isfinite(series->y[i]) || !isfinite(series->x[i])) continue;
            fprintf(out, "%s%.2f,%.2f", drawn++ ? " " : "", X_OF(series->x[i]),
                    Y_OF(series->y[i]));
        }
        fputs("\"/>\n", out);
        if (!series->markers && drawn != 1) continue;
        fprintf(out, "<g fill=\"%s\">\n", colour);
        for (int i = 0; i < series->n; i++) {
            if (!isfinite(series->y[i]) || !isfinite(series->x[i])) continue;
            fprintf(out, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"%s\"><title>", X_OF(series->x[i]),
                    Y_OF(series->y[i]), series->markers ? "3.5" : "2.5");
            if (categorical && series->x[i] >= 0 && series->x[i] < c->n_x_labels &&
                series->x[i] == floor(series->x[i]))
                xml_write_text(out, c->x_labels[(int)series->x[i]]);
            else
                fprintf(out, "%s %.10g", c->x_label ? c->x_label : "step", series->x[i]);
            fprintf(out, ": %.6g</title></circle>\n", series->y[i]);
        }
        fputs("</g>\n", out);
    }
#undef X_OF
#undef Y_OF

    /* legend, top right inside the plot */
    int legend_w = 140;
    for (int s = 0; s < c->n_series; s++) {
        int w = 52 + 6 * (int)strlen(c->series[s].label ? c->series[s].label : "");
        if (w > legend_w) legend_w = w < plot_w - 20 ? w : plot_w - 20;
    }
    int lx = left + plot_w - legend_w - 10, ly = top + 10;
    if (c->n_series > 0)
        fprintf(out,
                "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"white\" "
                "fill-opacity=\"0.85\" stroke=\"#bbb\"/>\n",
                lx, ly, legend_w, 6 + 20 * c->n_series);
    for (int s = 0; s < c->n_series; s++) {
        const char *colour = palette[s % N_COLOURS];
        int y = ly + 13 + 20 * s;
        fprintf(out,
                "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" "
                "stroke-width=\"1.5\"/>\n",
                lx + 8, y, lx + 32, y, colour);
        if (c->series[s].markers)
            fprintf(out, "<circle cx=\"%d\" cy=\"%d\" r=\"3.5\" fill=\"%s\"/>\n", lx + 20, y,
                    colour);
        fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"11\" dominant-baseline=\"central\">",
                lx + 40, y);
        xml_write_text(out, c->series[s].label ? c->series[s].label : "");
        fputs("</text>\n", out);
    }
    fputs("</svg>\n", out);
}

int plot_lines(const char *path, const struct plot *plot, char *err, size_t err_size)
{
    for (int s = 0; s < plot->n_series; s++)
        if (plot->series[s].n < 0 || (plot->series[s].n > 0 && (!plot->series[s].x ||
                                                                 !plot->series[s].y))) {
            snprintf(err, err_size, "%s: plot: no data arrays for series %d (%d points)", path, s,
                     plot->series[s].n);
            return -1;
        }
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        snprintf(err, err_size, "%s: path too long", path);
        return -1;
    }
    FILE *out = fopen(tmp, "w");
    if (!out) {
        snprintf(err, err_size, "%s: cannot create: %s", tmp, strerror(errno));
        return -1;
    }
    chart_body(out, plot);
    return file_commit(out, tmp, path, err, err_size);
}

int plot_loss_curve(const char *path, const char *title, const long long *steps, const double *loss,
                    int n, const long long *eval_steps, const double *eval_loss, int n_eval,
                    char *err, size_t err_size)
{
    if (n < 0 || n_eval < 0 || (n > 0 && (!steps || !loss)) ||
        (n_eval > 0 && (!eval_steps || !eval_loss))) {
        snprintf(err, err_size, "%s: plot_loss_curve: no data arrays for %d and %d points", path, n,
                 n_eval);
        return -1;
    }
    /* the steps as the chart's x values */
    double *x = xmalloc(((size_t)n + (size_t)n_eval + 1) * sizeof *x);
    for (int i = 0; i < n; i++) x[i] = (double)steps[i];
    for (int i = 0; i < n_eval; i++) x[n + i] = (double)eval_steps[i];
    struct plot_series series[2] = {
        {"training loss", x, loss, n, false},
        {"evaluation loss", x + n, eval_loss, n_eval, true},
    };
    struct plot plot = {.title = title, .x_label = "step", .y_label = "loss", .integral_x = true,
                        .series = series, .n_series = n_eval > 0 ? 2 : 1};
    int status = plot_lines(path, &plot, err, err_size);
    free(x);
    return status;
}
