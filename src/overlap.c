/* overlap: tasks side by side (see overlap.h), for the select phase: each statistics file's
 * own selection, the task x task Jaccard and score-share matrices per MoE layer and
 * overall, the printed tables and the picture. */
#include "overlap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files.h"
#include "log.h"

void overlap_run(const struct routing_stats *const *stats, const char *const *paths, int n_stats,
                 enum score_function function, double top_p, struct task_overlap *out)
{
    double start = wall_time();
    int T = n_stats, Lm = stats[0]->n_moe_layers, E = stats[0]->num_experts;
    size_t TT = (size_t)T * T;
    *out = (struct task_overlap){.n_tasks = T,
                                 .n_moe_layers = Lm,
                                 .num_experts = E,
                                 .paths = paths,
                                 .score_function = function,
                                 .top_p = top_p,
                                 .tasks = xcalloc((size_t)T, sizeof *out->tasks),
                                 .jaccard = xcalloc((size_t)Lm * TT, sizeof(double)),
                                 .share = xcalloc((size_t)Lm * TT, sizeof(double)),
                                 .mean_jaccard = xcalloc(TT, sizeof(double)),
                                 .mean_share = xcalloc(TT, sizeof(double))};

    /* chosen [T, Lm, E]: 1 where task a's own selection holds expert e of layer l */
    unsigned char *chosen = xcalloc((size_t)T * Lm * E, 1);
    for (int a = 0; a < T; a++) {
        const struct expert_selection *s = &out->tasks[a];
        select_experts(&stats[a], 1, function, top_p, false, &out->tasks[a]);
        for (int l = 0; l < Lm; l++)
            for (int i = 0; i < s->n_chosen[l]; i++)
                chosen[((size_t)a * Lm + l) * E + s->chosen[(size_t)l * E + i]] = 1;
    }
    for (int l = 0; l < Lm; l++)
        for (int a = 0; a < T; a++) {
            const double *score = &out->tasks[a].scores[(size_t)l * E];
            const unsigned char *in_a = &chosen[((size_t)a * Lm + l) * E];
            double total = 0;
            for (int e = 0; e < E; e++) total += score[e];
            for (int b = 0; b < T; b++) {
                const unsigned char *in_b = &chosen[((size_t)b * Lm + l) * E];
                int both = 0, either = 0;
                double on_b = 0;
                for (int e = 0; e < E; e++) {
                    both += in_a[e] & in_b[e];
                    either += in_a[e] | in_b[e];
                    if (in_b[e]) on_b += score[e];
                }
                size_t at = (size_t)l * TT + (size_t)a * T + b;
                out->jaccard[at] = either > 0 ? (double)both / either : 1.0;
                out->share[at] = total > 0 ? on_b / total : 0.0;
                out->mean_jaccard[(size_t)a * T + b] += out->jaccard[at];
                out->mean_share[(size_t)a * T + b] += out->share[at];
            }
        }
    for (size_t i = 0; i < TT && Lm > 0; i++) {
        out->mean_jaccard[i] /= Lm;
        out->mean_share[i] /= Lm;
    }
    free(chosen);
    out->seconds = wall_time() - start;
}

void overlap_free(struct task_overlap *o)
{
    for (int a = 0; o->tasks && a < o->n_tasks; a++) expert_selection_free(&o->tasks[a]);
    free(o->tasks);
    free(o->jaccard);
    free(o->share);
    free(o->mean_jaccard);
    free(o->mean_share);
    memset(o, 0, sizeof *o);
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int longest_name(const struct task_overlap *o)
{
    int longest = 4; /* "task" */
    for (int a = 0; a < o->n_tasks; a++) {
        int n = (int)strlen(base_name(o->paths[a]));
        if (n > longest) longest = n;
    }
    return longest;
}

/* One matrix [T, T]: a header of column numbers, then a row per task. */
static void log_matrix(const struct task_overlap *o, const char *title, const double *m)
{
    int T = o->n_tasks, name_w = longest_name(o);
    size_t size = (size_t)name_w + 16 + 8 * (size_t)T;
    char *line = xmalloc(size);
    log_info("select:   %s", title);
    int used = snprintf(line, size, "     %-*s", name_w, "task");
    for (int b = 0; b < T; b++) used += snprintf(line + used, size - used, " %6d", b + 1);
    log_info("select:   %s", line);
    for (int a = 0; a < T; a++) {
        used = snprintf(line, size, "%4d %-*s", a + 1, name_w, base_name(o->paths[a]));
        for (int b = 0; b < T; b++)
            used += snprintf(line + used, size - used, " %6.3f", m[(size_t)a * T + b]);
        log_info("select:   %s", line);
    }
    free(line);
}

void overlap_log(const struct task_overlap *o)
{
    log_info("select: tasks side by side: each statistics file one task, its experts chosen "
             "on its own; mean over %d MoE layers (%.2f ms)",
             o->n_moe_layers, 1e3 * o->seconds);
    log_matrix(o, "Jaccard similarity of the chosen experts", o->mean_jaccard);
    log_matrix(o, "share of the row task's score on the column task's chosen experts",
               o->mean_share);
}

/* ---- the picture ------------------------------------------------------------------- */

/* Text that reads on viridis colour t: white on the dark (low) end, black on the light. */
static const char *text_on(double t)
{
    return t < 0.65 ? "white" : "black";
}

/* One T x T grid with its top-left corner at (x, y), cells of `cell` pixels. */
static void svg_grid(FILE *out, const struct task_overlap *o, const double *m, const char *title,
                     const char *what, int x, int y, int cell)
{
    int T = o->n_tasks, font = cell >= 40 ? 12 : 10;
    char colour[8];
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"12\" font-weight=\"bold\">%s</text>\n", x,
            y - 30, title);
    for (int b = 0; b < T; b++)
        fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"10\" text-anchor=\"middle\">%d</text>\n",
                x + b * cell + cell / 2, y - 8, b + 1);
    for (int a = 0; a < T; a++)
        for (int b = 0; b < T; b++) {
            double v = m[(size_t)a * T + b];
            int cx = x + b * cell, cy = y + a * cell;
            svg_viridis(v, colour);
            fprintf(out,
                    "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\" "
                    "stroke=\"#888\" stroke-width=\"0.5\"><title>",
                    cx, cy, cell, cell, colour);
            xml_write_text(out, base_name(o->paths[a]));
            fputs(" vs ", out);
            xml_write_text(out, base_name(o->paths[b]));
            fprintf(out, ": %s %.4f</title></rect>\n", what, v);
            fprintf(out,
                    "<text x=\"%d\" y=\"%d\" font-size=\"%d\" text-anchor=\"middle\" "
                    "dominant-baseline=\"central\" fill=\"%s\">%.2f</text>\n",
                    cx + cell / 2, cy + cell / 2, font, text_on(v), v);
        }
}

static void svg_body(FILE *out, const void *context)
{
    const struct task_overlap *o = context;
    int T = o->n_tasks;
    int cell = 400 / (T > 0 ? T : 1);
    if (cell > 56) cell = 56;
    if (cell < 24) cell = 24;
    int label_w = 7 * (longest_name(o) + 4), left = 24 + label_w, top = 112, gap = 48;
    /* a grid's title needs about 240 pixels, however few the tasks */
    int grid = T * cell, span = grid > 240 ? grid : 240;
    int right_x = left + span + gap, legend_x = right_x + grid + 32;
    int width = legend_x + 80, height = top + (grid > 170 ? grid : 170) + 40;
    if (width < right_x + span) width = right_x + span;
    if (width < 720) width = 720; /* room for the title */

    svg_begin(out, width, height);
    fprintf(out,
            "<text x=\"24\" y=\"24\" font-size=\"16\" font-weight=\"bold\">ESFT tasks side by "
            "side: %s score, top_p = %g</text>\n",
            o->score_function == SCORE_FUNCTION_GATE ? "gate" : "token", o->top_p);
    fprintf(out,
            "<text x=\"24\" y=\"44\" font-size=\"11\" fill=\"#444\">each statistics file one "
            "task, its experts chosen on its own; mean over %d MoE layers; rows: task a, "
            "columns: task b</text>\n",
            o->n_moe_layers);
    for (int a = 0; a < T; a++) {
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"11\" text-anchor=\"end\" "
                "dominant-baseline=\"central\">",
                left - 8, top + a * cell + cell / 2);
        xml_write_text(out, base_name(o->paths[a]));
        fprintf(out, "  %d</text>\n", a + 1);
    }
    svg_grid(out, o, o->mean_jaccard, "Jaccard of the chosen experts", "Jaccard", left, top, cell);
    svg_grid(out, o, o->mean_share, "share of a's score on b's experts", "score share", right_x,
             top, cell);

    /* legend: one scale from 0 (bottom) to 1 (top) for both grids */
    int bar_h = 160;
    char colour[8];
    fputs("<defs><linearGradient id=\"tasks_scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n", out);
    for (int i = 0; i <= 8; i++) {
        svg_viridis(i / 8.0, colour);
        fprintf(out, "<stop offset=\"%.3f\" stop-color=\"%s\"/>\n", i / 8.0, colour);
    }
    fputs("</linearGradient></defs>\n", out);
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"16\" height=\"%d\" fill=\"url(#tasks_scale)\" "
            "stroke=\"#444\" stroke-width=\"0.5\"/>\n",
            legend_x, top, bar_h);
    for (int i = 0; i <= 4; i++) {
        int y = top + bar_h * i / 4;
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"10\" dominant-baseline=\"central\">"
                "%.2f</text>\n",
                legend_x + 22, y, (4 - i) / 4.0);
    }
    fputs("</svg>\n", out);
}

int overlap_write_svg(const char *path, const struct task_overlap *o, char *err, size_t err_size)
{
    return file_write_atomically(path, svg_body, o, err, err_size);
}
