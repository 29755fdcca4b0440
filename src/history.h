/* history: the training history of an output directory, read back from its
 * metrics.jsonl, and drawn (loss.svg), for the loss picture and the run summary of the
 * train phase; its line chart (plot_lines) also draws the sweep summary's picture
 * (sweep_summary.c).
 *
 * A training that was stopped and resumed appends one segment per run to the same
 * metrics file. Each segment opens with a "train_start" line naming the step it starts
 * from; a later segment replaces whatever an earlier one logged after that step (a run
 * resumed from an older checkpoint replays those steps; a segment from step 0 starts a
 * new history). So the curves are those of the
 * lineage that led to the last segment, whatever was interrupted on the way. */
#ifndef ESFT_HISTORY_H
#define ESFT_HISTORY_H

#include <stdbool.h>
#include <stddef.h>

struct curve {
    int n, capacity;
    long long *step;
    double *loss;
};

void curve_add(struct curve *c, long long step, double loss);
/* Drops the points after `step`. */
void curve_cut_after(struct curve *c, long long step);
void curve_free(struct curve *c);

/* Reads OUTPUT_DIR/metrics.jsonl into the training loss per step and the validation
 * loss (nulls skipped). A missing file gives empty curves. 0, or -1 with a message
 * naming the file and line. */
int history_read(const char *output_dir, struct curve *train, struct curve *eval, char *err,
                 size_t err_size);

/* A line chart: each series a polyline of (x, y) points in its own colour (the first
 * two blue and red), named in a legend; non-finite points are left out. x_labels, when
 * given, makes the x axis categorical: the series' x values are the indices 0 .. n-1 of
 * those labels. */
struct plot_series {
    const char *label;
    const double *x, *y;
    int n;
    bool markers; /* a dot on each point, its value on hover */
};
struct plot {
    const char *title, *x_label, *y_label;
    bool integral_x; /* ticks on whole numbers (steps) */
    const char *const *x_labels;
    int n_x_labels;
    const struct plot_series *series;
    int n_series;
};
/* Writes the chart as SVG to path (through a temporary name). 0, or -1 with a message. */
int plot_lines(const char *path, const struct plot *plot, char *err, size_t err_size);

/* An SVG line chart of the training loss per step and the evaluation loss (points at
 * eval_steps), for a person to open in a browser. 0, or -1. */
int plot_loss_curve(const char *path, const char *title, const long long *steps,
                    const double *loss, int n, const long long *eval_steps,
                    const double *eval_loss, int n_eval, char *err, size_t err_size);

#endif
