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

struct chart {
    const char *title;
    const long long *steps;
    const double *loss;
    int n;
    const long long *eval_steps;
    const double *eval_loss;
    int n_eval;
};

static void chart_body(FILE *out, const struct chart *c)
{
    const int width = 760, height = 460, left = 72, right = 24, top = 56, bottom = 56;
    const int plot_w = width - left - right, plot_h = height - top - bottom;
    /* data ranges over both series, finite losses only */
    double x_lo = INFINITY, x_hi = -INFINITY, y_lo = INFINITY, y_hi = -INFINITY;
    for (int s = 0; s < 2; s++) {
        const long long *steps = s ? c->eval_steps : c->steps;
        const double *loss = s ? c->eval_loss : c->loss;
        int n = s ? c->n_eval : c->n;
        for (int i = 0; i < n; i++) {
            if (!isfinite(loss[i])) continue;
            x_lo = fmin(x_lo, (double)steps[i]);
            x_hi = fmax(x_hi, (double)steps[i]);
            y_lo = fmin(y_lo, loss[i]);
            y_hi = fmax(y_hi, loss[i]);
        }
    }
    if (x_lo > x_hi) { /* nothing to draw: an empty unit chart */
        x_lo = 0;
        x_hi = 1;
    }
    if (y_lo > y_hi) {
        y_lo = 0;
        y_hi = 1;
    }
    double x_tick, y_tick;
    axis_range(&x_lo, &x_hi, &x_tick, true);
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
    for (int i = 0; i <= 40; i++) {
        double v = x_lo + i * x_tick;
        if (v > x_hi + x_tick * 1e-6) break;
        double x = X_OF(v);
        fprintf(out,
                "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#e4e4e4\"/>\n"
                "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#444\"/>\n"
                "<text x=\"%.2f\" y=\"%d\" text-anchor=\"middle\">%.10g</text>\n",
                x, top, x, top + plot_h, x, top + plot_h, x, top + plot_h + 4, x, top + plot_h + 16,
                v);
    }
    fputs("</g>\n", out);
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#444\"/>\n",
            left, top, plot_w, plot_h);
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">step</text>\n",
            left + plot_w / 2, height - 16);
    fprintf(out,
            "<text x=\"18\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\" "
            "transform=\"rotate(-90 18 %d)\">loss</text>\n",
            top + plot_h / 2, top + plot_h / 2);

    /* training loss: one polyline (a lone point also gets a dot, which a polyline of
     * one vertex does not draw) */
    fputs("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"", out);
    int drawn = 0;
    for (int i = 0; i < c->n; i++) {
        if (!isfinite(c->loss[i])) continue;
        fprintf(out, "%s%.2f,%.2f", drawn++ ? " " : "", X_OF((double)c->steps[i]),
                Y_OF(c->loss[i]));
    }
    fputs("\"/>\n", out);
    if (drawn == 1)
        for (int i = 0; i < c->n; i++)
            if (isfinite(c->loss[i]))
                fprintf(out, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"2.5\" fill=\"#1f77b4\"/>\n",
                        X_OF((double)c->steps[i]), Y_OF(c->loss[i]));

    /* evaluation loss: points joined by a line */
    if (c->n_eval > 0) {
        fputs("<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" points=\"", out);
        drawn = 0;
        for (int i = 0; i < c->n_eval; i++) {
            if (!isfinite(c->eval_loss[i])) continue;
            fprintf(out, "%s%.2f,%.2f", drawn++ ? " " : "", X_OF((double)c->eval_steps[i]),
                    Y_OF(c->eval_loss[i]));
        }
        fputs("\"/>\n<g fill=\"#d62728\">\n", out);
        for (int i = 0; i < c->n_eval; i++) {
            if (!isfinite(c->eval_loss[i])) continue;
            fprintf(out,
                    "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"3.5\"><title>step %lld: %.6g"
                    "</title></circle>\n",
                    X_OF((double)c->eval_steps[i]), Y_OF(c->eval_loss[i]), c->eval_steps[i],
                    c->eval_loss[i]);
        }
        fputs("</g>\n", out);
    }
#undef X_OF
#undef Y_OF

    /* legend, top right inside the plot */
    int lx = left + plot_w - 150, ly = top + 10;
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"140\" height=\"%d\" fill=\"white\" "
            "fill-opacity=\"0.85\" stroke=\"#bbb\"/>\n",
            lx, ly, c->n_eval > 0 ? 46 : 26);
    fprintf(out,
            "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#1f77b4\" "
            "stroke-width=\"1.5\"/>\n<text x=\"%d\" y=\"%d\" font-size=\"11\" "
            "dominant-baseline=\"central\">training loss</text>\n",
            lx + 8, ly + 13, lx + 32, ly + 13, lx + 40, ly + 13);
    if (c->n_eval > 0)
        fprintf(out,
                "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#d62728\" "
                "stroke-width=\"1.5\"/>\n<circle cx=\"%d\" cy=\"%d\" r=\"3.5\" "
                "fill=\"#d62728\"/>\n<text x=\"%d\" y=\"%d\" font-size=\"11\" "
                "dominant-baseline=\"central\">evaluation loss</text>\n",
                lx + 8, ly + 33, lx + 32, ly + 33, lx + 20, ly + 33, lx + 40, ly + 33);
    fputs("</svg>\n", out);
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
    struct chart chart = {title, steps, loss, n, eval_steps, eval_loss, n_eval};
    chart_body(out, &chart);
    return file_commit(out, tmp, path, err, err_size);
}
