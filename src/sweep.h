/* sweep: parameter sweeps from one deck, for main (and jobs/esft-sweep through it).
 *
 * A deck's `sweep:` block names deck keys with lists of values:
 *
 *     sweep:
 *       mode: grid                  # every combination (default); zip: the i-th values together
 *       select.top_p: [0.1, 0.2]
 *       train.lr: [1e-3, 3e-3]
 *
 * Each point of the sweep is the deck with one value per key applied as an override. Its
 * name is made of the values (`top_p-0.1_lr-1e-3`), so it stays the same when points
 * are added, and it writes into RUN.OUTPUT_DIR/sweep/NAME.
 *
 * The deck's phases split in two, from which keys each phase reads (deck_key_readers,
 * the deck's schema): the phases before the first one that reads a swept key are shared
 * and run once, in run.output_dir (`esft DECK --sweep shared`); that phase and every
 * later one run per point (`esft DECK --sweep-point N`), reading the shared phases'
 * outputs: the statistics for select (select.stats), the expert configuration for train
 * (train.expert_config), unless the deck names them. The shared run leaves the resolved
 * deck it ran as RUN.OUTPUT_DIR/sweep/shared.yaml; a point refuses to start unless that
 * file is there and equal to its own deck's shared part (outputs of another deck, or of
 * a shared run that failed or still runs, are never mixed into a point).
 *
 * A per-point eval after a per-point train evaluates the point's own trained result
 * (deck_finish derives eval.adapter, or eval.model for method lora, from the point's
 * output directory); after a shared train, the shared run's (sweep_deck).
 *
 * `esft --sweep summary DECK` reads each point's directory back (metrics.jsonl,
 * eval.json) into RUN.OUTPUT_DIR/sweep/summary.md, summary.csv, summary.svg and
 * curves.svg (sweep_summary.c). */
#ifndef ESFT_SWEEP_H
#define ESFT_SWEEP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "deck.h"

#define SWEEP_MAX_KEYS 8
#define SWEEP_MAX_VALUES 64
#define SWEEP_MAX_POINTS 4096
#define SWEEP_SHARED (-1) /* the role of the shared phases, beside points 0 .. n-1 */

enum sweep_mode { SWEEP_GRID, SWEEP_ZIP };

struct sweep_key {
    char *path;                     /* a deck key, "select.top_p" */
    char *values[SWEEP_MAX_VALUES]; /* as written in the deck */
    bool quoted[SWEEP_MAX_VALUES];  /* written in quotes: a string, whatever it looks like */
    int n_values;
    int line, col; /* of the key in the deck, 1-based */
    /* the first value listed a second time (refused in grid mode): where, and which */
    int repeat_line, repeat_col, repeated;
};

struct sweep {
    bool present; /* the deck has a sweep block */
    enum sweep_mode mode;
    struct sweep_key keys[SWEEP_MAX_KEYS];
    int n_keys;
    int n_points;
    /* what every point's deck is made from (borrowed from the caller) */
    const char *file, *text;
    size_t length;
    const char *const *overrides;
    int n_overrides;
    /* set by sweep_plan, from the deck without its sweep */
    enum phase shared[PHASE_COUNT], per_point[PHASE_COUNT];
    int n_shared, n_per_point;
    char *base_name, *base_dir;    /* run.name, run.output_dir (resolved) */
    char *names[SWEEP_MAX_POINTS]; /* each point's name */
};

/* Reads the sweep block of the deck text (none: sw->present false, 0 returned), keeping
 * file, text and the command-line overrides for the points' decks. Returns the number of
 * errors, each `FILE:LINE:COL: message` in err (as deck_parse). */
int sweep_read(struct sweep *sw, const char *file, const char *text, size_t length,
               const char *const *overrides, int n_overrides, char *err, size_t err_size);

/* Splits the phases of `deck` (the deck and its overrides, without the sweep, checked by
 * deck_finish) into shared and per-point ones, names the points, and checks every point's
 * deck (each value read as its key's type, checked as a run would: deck_finish). Returns
 * the number of errors (messages as sweep_read). */
int sweep_plan(struct sweep *sw, const struct deck *deck, char *err, size_t err_size);

/* The deck of a point (0 .. n_points-1) or of SWEEP_SHARED, checked by deck_finish, into
 * a deck from deck_defaults. Returns the number of errors (messages as sweep_read). */
int sweep_deck(const struct sweep *sw, int point, struct deck *deck, char *err, size_t err_size);

/* Point `point`'s value index of each key (grid: the last key varies fastest). */
void sweep_point_values(const struct sweep *sw, int point, int index[SWEEP_MAX_KEYS]);
/* RUN.OUTPUT_DIR/sweep/NAME of a point, into buf. */
void sweep_point_dir(const struct sweep *sw, int point, char *buf, size_t size);

/* `esft --sweep list`: the phases' split and one line per point, "INDEX NAME DIR"
 * (tab-separated; other lines start with #). */
void sweep_list(const struct sweep *sw, FILE *out);

/* The resolved deck of the shared phases, as sweep/shared.yaml holds it (malloc'd). */
char *sweep_shared_text(const struct sweep *sw);
/* After the shared phases succeeded: writes RUN.OUTPUT_DIR/sweep/shared.yaml. 0, or -1. */
int sweep_mark_shared(const struct sweep *sw, const char *shared_text, char *err, size_t err_size);
/* Before the shared phases run: removes that file (points refuse to start meanwhile). */
void sweep_unmark_shared(const struct sweep *sw);
/* Before a point runs: 0 when the shared phases ran, to the end, from this deck; else
 * -1 with what to do in err. */
int sweep_check_shared(const struct sweep *sw, char *err, size_t err_size);

/* `esft --sweep summary`: the table (markdown on out, and summary.md, summary.csv) and
 * the picture (summary.svg) of every point's results, in RUN.OUTPUT_DIR/sweep. 0, or -1
 * with a message (sweep_summary.c). */
int sweep_summary(const struct sweep *sw, FILE *out, char *err, size_t err_size);

void sweep_free(struct sweep *sw);

#endif
