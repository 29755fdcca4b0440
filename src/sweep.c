/* sweep: the deck's sweep block, its points and their decks, for main (see sweep.h).
 *
 * The block is read here with libyaml's event parser (deck.c passes over it): a mapping
 * of `mode` and deck keys, each with a value or a flow or block sequence of values. A
 * point's deck is the deck text parsed again with the command-line overrides, then the
 * point's values as overrides (so each value is read and checked as the key's type, as
 * on the command line), then the phases, names and paths the sweep gives it. */
#include "sweep.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "files.h"
#include "log.h"

#define MAX_NAME 200 /* longest point name: it is a directory name */

/* ---- errors ---------------------------------------------------------------------------- */

struct errors {
    char *buf;
    size_t size, used;
    int count;
};

static void add_error(struct errors *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_error(struct errors *e, const char *fmt, ...)
{
    e->count++;
    if (!e->buf || e->used + 2 >= e->size) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->buf + e->used, e->size - e->used - 1, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    e->used += (size_t)n < e->size - e->used - 2 ? (size_t)n : e->size - e->used - 2;
    e->buf[e->used++] = '\n';
    e->buf[e->used] = '\0';
}

/* Appends a message block (lines) from another reader, each line prefixed. */
static void add_lines(struct errors *e, int count, const char *prefix, const char *lines)
{
    const char *line = lines;
    int shown = 0;
    while (*line) {
        const char *end = strchr(line, '\n');
        int n = end ? (int)(end - line) : (int)strlen(line);
        if (n > 0) {
            add_error(e, "%s%.*s", prefix, n, line);
            shown++;
        }
        line += n + (end ? 1 : 0);
    }
    e->count += count - shown; /* lines cut from the reader's buffer still count */
}

/* ---- reading the block ------------------------------------------------------------- */

struct reader {
    yaml_parser_t parser;
    yaml_event_t event;
    bool have_event, failed;
};

static bool next(struct reader *r)
{
    if (r->have_event) yaml_event_delete(&r->event);
    r->have_event = false;
    if (r->failed || !yaml_parser_parse(&r->parser, &r->event)) {
        r->failed = true; /* deck_parse reports the YAML error itself */
        return false;
    }
    r->have_event = true;
    return true;
}

/* Consumes the node that starts at the current event. */
static bool skip_node(struct reader *r)
{
    int depth = 0;
    do {
        yaml_event_type_t t = r->event.type;
        if (t == YAML_MAPPING_START_EVENT || t == YAML_SEQUENCE_START_EVENT) depth++;
        if (t == YAML_MAPPING_END_EVENT || t == YAML_SEQUENCE_END_EVENT) depth--;
        if (depth == 0) return true;
    } while (next(r));
    return false;
}

static int mark_line(const yaml_event_t *ev)
{
    return (int)ev->start_mark.line + 1;
}
static int mark_col(const yaml_event_t *ev)
{
    return (int)ev->start_mark.column + 1;
}

static const char *scalar_text(const yaml_event_t *ev)
{
    return (const char *)ev->data.scalar.value;
}

static bool scalar_quoted(const yaml_event_t *ev)
{
    return ev->data.scalar.style == YAML_SINGLE_QUOTED_SCALAR_STYLE ||
           ev->data.scalar.style == YAML_DOUBLE_QUOTED_SCALAR_STYLE;
}

/* One value of a swept key, at the current (scalar) event. */
static void add_value(struct sweep_key *key, const yaml_event_t *ev, const char *file,
                      struct errors *e)
{
    const char *text = scalar_text(ev);
    if (key->n_values == SWEEP_MAX_VALUES) {
        add_error(e, "%s:%d:%d: sweep: %s has more than %d values", file, mark_line(ev),
                  mark_col(ev), key->path, SWEEP_MAX_VALUES);
        return;
    }
    if (!*text) {
        add_error(e, "%s:%d:%d: sweep: %s: an empty value", file, mark_line(ev), mark_col(ev),
                  key->path);
        return;
    }
    for (int i = 0; i < key->n_values && !key->repeat_line; i++)
        if (strcmp(key->values[i], text) == 0) { /* an error in grid mode (sweep_read) */
            key->repeat_line = mark_line(ev), key->repeat_col = mark_col(ev);
            key->repeated = key->n_values;
        }
    key->quoted[key->n_values] = scalar_quoted(ev);
    key->values[key->n_values++] = xstrdup(text);
}

/* Keys the sweep sets itself, or that would make a point something else than a run of
 * the deck: refused with why. */
static const char *not_sweepable(const char *path)
{
    if (strcmp(path, "phase") == 0)
        return "phase cannot be swept: the sweep splits the deck's phases into shared and "
               "per-point ones itself";
    if (strncmp(path, "parallel.", 9) == 0)
        return "the layout is the launcher's (jobs/esft-sweep --pp, --ep), the same for every "
               "point";
    if (strcmp(path, "run.name") == 0 || strcmp(path, "run.output_dir") == 0)
        return "each point's run.name and run.output_dir are the sweep's (RUN.OUTPUT_DIR/sweep/"
               "NAME, named by its values)";
    return NULL;
}

/* The sweep mapping, its MAPPING_START being the current event. */
static void read_block(struct sweep *sw, struct reader *r, struct errors *e)
{
    const char *file = sw->file;
    while (next(r) && r->event.type != YAML_MAPPING_END_EVENT) {
        if (r->event.type != YAML_SCALAR_EVENT) {
            add_error(e, "%s:%d:%d: sweep: expected a key name", file, mark_line(&r->event),
                      mark_col(&r->event));
            if (!skip_node(r) || !next(r) || !skip_node(r)) return;
            continue;
        }
        char *name = xstrdup(scalar_text(&r->event));
        int line = mark_line(&r->event), col = mark_col(&r->event);
        if (!next(r)) {
            free(name);
            return;
        }
        yaml_event_t *v = &r->event;
        if (v->type == YAML_ALIAS_EVENT) {
            add_error(e, "%s:%d:%d: sweep: anchors and aliases are not supported", file,
                      mark_line(v), mark_col(v));
        } else if (strcmp(name, "mode") == 0) {
            const char *mode = v->type == YAML_SCALAR_EVENT ? scalar_text(v) : "";
            if (strcmp(mode, "grid") == 0)
                sw->mode = SWEEP_GRID;
            else if (strcmp(mode, "zip") == 0)
                sw->mode = SWEEP_ZIP;
            else
                add_error(e,
                          "%s:%d:%d: sweep: mode must be grid (every combination) or zip (the "
                          "i-th value of every key together)",
                          file, mark_line(v), mark_col(v));
            if (v->type != YAML_SCALAR_EVENT && !skip_node(r)) break;
        } else {
            const char *why = not_sweepable(name);
            int k = -1;
            for (int i = 0; i < sw->n_keys; i++)
                if (strcmp(sw->keys[i].path, name) == 0) k = i;
            if (why) {
                add_error(e, "%s:%d:%d: sweep: %s", file, line, col, why);
            } else if (deck_key_readers(name, &(unsigned){0}) != 0) {
                add_error(e,
                          "%s:%d:%d: sweep: %s is not a deck key (keys are written in full, "
                          "select.top_p; see esft --help-deck)",
                          file, line, col, name);
            } else if (k >= 0) {
                add_error(e, "%s:%d:%d: sweep: %s is swept twice (first at %d:%d)", file, line, col,
                          name, sw->keys[k].line, sw->keys[k].col);
            } else if (sw->n_keys == SWEEP_MAX_KEYS) {
                add_error(e, "%s:%d:%d: sweep: more than %d keys", file, line, col, SWEEP_MAX_KEYS);
            } else {
                k = sw->n_keys++;
                sw->keys[k] = (struct sweep_key){.path = xstrdup(name), .line = line, .col = col};
            }
            struct sweep_key *key = k >= 0 && sw->keys[k].line == line ? &sw->keys[k] : NULL;
            if (v->type == YAML_SCALAR_EVENT) {
                if (key) add_value(key, v, file, e);
            } else if (v->type == YAML_SEQUENCE_START_EVENT) {
                while (next(r) && r->event.type != YAML_SEQUENCE_END_EVENT) {
                    if (r->event.type == YAML_SCALAR_EVENT) {
                        if (key) add_value(key, &r->event, file, e);
                        continue;
                    }
                    add_error(e,
                              "%s:%d:%d: sweep: %s: each value must be a single value (a "
                              "list-valued key is swept as a quoted flow list, \"[a, b]\")",
                              file, mark_line(&r->event), mark_col(&r->event), name);
                    if (!skip_node(r)) break;
                }
            } else {
                add_error(e, "%s:%d:%d: sweep: %s: expected a list of values", file, mark_line(v),
                          mark_col(v), name);
                if (!skip_node(r)) break;
            }
            if (key && key->n_values == 0)
                add_error(e, "%s:%d:%d: sweep: %s has no values", file, line, col, name);
        }
        free(name);
    }
}

int sweep_read(struct sweep *sw, const char *file, const char *text, size_t length,
               const char *const *overrides, int n_overrides, char *err, size_t err_size)
{
    memset(sw, 0, sizeof *sw);
    sw->file = file, sw->text = text, sw->length = length;
    sw->overrides = overrides, sw->n_overrides = n_overrides;
    struct errors e = {err_size ? err : NULL, err_size, 0, 0};
    if (e.buf) e.buf[0] = '\0';

    struct reader r = {0};
    if (!yaml_parser_initialize(&r.parser)) fatal(EXIT_RUNTIME, "libyaml: out of memory");
    yaml_parser_set_input_string(&r.parser, (const unsigned char *)text, length);
    int line = 0, col = 0;
    /* stream, document, the root mapping; then its keys */
    if (next(&r) && next(&r) && r.event.type == YAML_DOCUMENT_START_EVENT && next(&r) &&
        r.event.type == YAML_MAPPING_START_EVENT) {
        while (next(&r) && r.event.type == YAML_SCALAR_EVENT) {
            bool is_sweep = strcmp(scalar_text(&r.event), DECK_SWEEP_SECTION) == 0;
            line = is_sweep ? mark_line(&r.event) : line;
            col = is_sweep ? mark_col(&r.event) : col;
            if (!next(&r)) break;
            if (!is_sweep) {
                if (!skip_node(&r)) break;
                continue;
            }
            if (sw->present) {
                add_error(&e, "%s:%d:%d: duplicate section sweep", file, line, col);
                if (!skip_node(&r)) break;
                continue;
            }
            sw->present = true;
            if (r.event.type == YAML_MAPPING_START_EVENT) {
                read_block(sw, &r, &e);
            } else {
                add_error(&e,
                          "%s:%d:%d: sweep: expected a mapping of deck keys to lists of "
                          "values (select.top_p: [0.1, 0.2])",
                          file, line, col);
                if (!skip_node(&r)) break;
            }
        }
    }
    if (r.have_event) yaml_event_delete(&r.event);
    yaml_parser_delete(&r.parser);
    if (!sw->present) return e.count;

    if (sw->n_keys == 0 && e.count == 0)
        add_error(&e, "%s:%d:%d: sweep: no keys to sweep", file, line, col);
    /* a value listed twice makes two equal points in a grid; in zip mode the other keys'
     * values tell its points apart (two equal points get equal names: sweep_plan) */
    for (int k = 0; k < sw->n_keys && sw->mode == SWEEP_GRID; k++)
        if (sw->keys[k].repeat_line)
            add_error(&e, "%s:%d:%d: sweep: %s lists %s twice", file, sw->keys[k].repeat_line,
                      sw->keys[k].repeat_col, sw->keys[k].path,
                      sw->keys[k].values[sw->keys[k].repeated]);
    if (e.count) return e.count;
    long long n = sw->mode == SWEEP_ZIP ? sw->keys[0].n_values : 1;
    for (int k = 0; k < sw->n_keys; k++) {
        if (sw->mode == SWEEP_GRID) {
            n *= sw->keys[k].n_values;
        } else if (sw->keys[k].n_values != n) {
            add_error(&e,
                      "%s:%d:%d: sweep: mode zip pairs the i-th values of every key: %s has "
                      "%d values, %s has %lld",
                      file, sw->keys[k].line, sw->keys[k].col, sw->keys[k].path,
                      sw->keys[k].n_values, sw->keys[0].path, n);
        }
        if (n > SWEEP_MAX_POINTS) break;
    }
    if (n > SWEEP_MAX_POINTS)
        add_error(&e, "%s:%d:%d: sweep: more than %d points", file, line, col, SWEEP_MAX_POINTS);
    sw->n_points = (int)n;
    return e.count;
}

/* ---- points ---------------------------------------------------------------------------- */

void sweep_point_values(const struct sweep *sw, int point, int index[SWEEP_MAX_KEYS])
{
    for (int k = sw->n_keys - 1; k >= 0; k--) {
        if (sw->mode == SWEEP_ZIP) {
            index[k] = point;
        } else {
            index[k] = point % sw->keys[k].n_values;
            point /= sw->keys[k].n_values;
        }
    }
}

/* The name of a point: LABEL-VALUE for each key, joined by _, where LABEL is the key's
 * last part (its full path when two swept keys share that part) and the value keeps
 * letters, digits and . + -, every other byte becoming -. */
static void point_name(const struct sweep *sw, int point, char *buf, size_t size)
{
    int index[SWEEP_MAX_KEYS];
    sweep_point_values(sw, point, index);
    size_t used = 0;
    buf[0] = '\0';
    for (int k = 0; k < sw->n_keys; k++) {
        const char *leaf = strrchr(sw->keys[k].path, '.');
        leaf = leaf ? leaf + 1 : sw->keys[k].path;
        for (int j = 0; j < sw->n_keys; j++) {
            const char *other = strrchr(sw->keys[j].path, '.');
            other = other ? other + 1 : sw->keys[j].path;
            if (j != k && strcmp(leaf, other) == 0) leaf = sw->keys[k].path;
        }
        used += (size_t)snprintf(buf + used, used < size ? size - used : 0, "%s%s-", k ? "_" : "",
                                 leaf);
        for (const char *c = sw->keys[k].values[index[k]]; *c && used + 1 < size; c++) {
            bool keep = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                        (*c >= '0' && *c <= '9') || *c == '.' || *c == '+' || *c == '-';
            buf[used++] = keep ? *c : '-';
            buf[used] = '\0';
        }
    }
}

void sweep_point_dir(const struct sweep *sw, int point, char *buf, size_t size)
{
    snprintf(buf, size, "%s/sweep/%s", sw->base_dir, sw->names[point]);
}

/* A YAML double-quoted scalar of text, for an override. */
static void quote(const char *text, char *buf, size_t size)
{
    size_t used = 0;
    if (size < 3) return;
    buf[used++] = '"';
    for (const char *c = text; *c && used + 3 < size; c++) {
        if (*c == '"' || *c == '\\') buf[used++] = '\\';
        buf[used++] = *c;
    }
    buf[used++] = '"';
    buf[used] = '\0';
}

/* dir/file, or file when it is absolute. */
static void beside(const char *dir, const char *file, char *buf, size_t size)
{
    if (file[0] == '/')
        snprintf(buf, size, "%s", file);
    else
        snprintf(buf, size, "%s/%s", dir, file);
}

static bool has_phase(const enum phase *phases, int n, enum phase phase)
{
    for (int i = 0; i < n; i++)
        if (phases[i] == phase) return true;
    return false;
}

/* Applies one override the sweep makes; its error, reworded, goes under the deck's
 * position `line:col`. */
static void apply(struct deck *deck, const char *assignment, const struct sweep *sw, int line,
                  int col, struct errors *e)
{
    char message[2048];
    if (deck_override(deck, assignment, message, sizeof message) == 0) return;
    const char *text = message;
    if (strncmp(text, "command line: ", 14) == 0) text += 14;
    char *newline = strchr(message, '\n');
    if (newline) *newline = '\0';
    add_error(e, "%s:%d:%d: sweep: %s", sw->file, line, col, text);
}

int sweep_deck(const struct sweep *sw, int point, struct deck *deck, char *err, size_t err_size)
{
    struct errors e = {err_size ? err : NULL, err_size, 0, 0};
    if (e.buf) e.buf[0] = '\0';
    char *messages = xcalloc(16384, 1);
    deck_defaults(deck);
    int n = deck_parse(deck, sw->file, sw->text, sw->length, messages, 16384);
    if (n) add_lines(&e, n, "", messages);
    for (int i = 0; i < sw->n_overrides && !n; i++) {
        int m = deck_override(deck, sw->overrides[i], messages, 16384);
        if (m) add_lines(&e, m, "", messages);
    }
    if (e.count) {
        free(messages);
        return e.count;
    }

    char assignment[8400], value[8200], path[8200];
    /* the phases of this role */
    const enum phase *phases = point == SWEEP_SHARED ? sw->shared : sw->per_point;
    int n_phases = point == SWEEP_SHARED ? sw->n_shared : sw->n_per_point;
    size_t used = (size_t)snprintf(assignment, sizeof assignment, "phase=[");
    for (int i = 0; i < n_phases; i++)
        used += (size_t)snprintf(assignment + used, sizeof assignment - used, "%s%s", i ? ", " : "",
                                 phase_name(phases[i]));
    snprintf(assignment + used, sizeof assignment - used, "]");
    apply(deck, assignment, sw, 1, 1, &e);

    if (point != SWEEP_SHARED) {
        int index[SWEEP_MAX_KEYS];
        sweep_point_values(sw, point, index);
        for (int k = 0; k < sw->n_keys; k++) {
            const struct sweep_key *key = &sw->keys[k];
            if (key->quoted[index[k]])
                quote(key->values[index[k]], value, sizeof value);
            else
                snprintf(value, sizeof value, "%s", key->values[index[k]]);
            snprintf(assignment, sizeof assignment, "%s=%s", key->path, value);
            apply(deck, assignment, sw, key->line, key->col, &e);
        }
        snprintf(path, sizeof path, "%s-%s", sw->base_name, sw->names[point]);
        quote(path, value, sizeof value);
        snprintf(assignment, sizeof assignment, "run.name=%s", value);
        apply(deck, assignment, sw, 1, 1, &e);
        sweep_point_dir(sw, point, path, sizeof path);
        quote(path, value, sizeof value);
        snprintf(assignment, sizeof assignment, "run.output_dir=%s", value);
        apply(deck, assignment, sw, 1, 1, &e);
        /* What a per-point phase reads from a shared one, relative to the shared run's
         * directory: score's statistics (select), select's expert configuration
         * (train), unless the deck names them itself. */
        if (has_phase(sw->per_point, sw->n_per_point, PHASE_SELECT) &&
            has_phase(sw->shared, sw->n_shared, PHASE_SCORE) && deck->select.n_stats == 0) {
            beside(sw->base_dir, deck->score.output, path, sizeof path);
            quote(path, value, sizeof value);
            snprintf(assignment, sizeof assignment, "select.stats=[%s]", value);
            apply(deck, assignment, sw, 1, 1, &e);
        }
        if (has_phase(sw->per_point, sw->n_per_point, PHASE_TRAIN) &&
            has_phase(sw->shared, sw->n_shared, PHASE_SELECT) && !deck->train.expert_config &&
            deck->train.method == METHOD_ESFT) {
            beside(sw->base_dir, deck->select.output, path, sizeof path);
            quote(path, value, sizeof value);
            snprintf(assignment, sizeof assignment, "train.expert_config=%s", value);
            apply(deck, assignment, sw, 1, 1, &e);
        }
        /* A per-point eval after a shared train evaluates what that train wrote (after a
         * per-point train, deck_finish points eval at the point's own output). */
        if (has_phase(sw->per_point, sw->n_per_point, PHASE_EVAL) &&
            has_phase(sw->shared, sw->n_shared, PHASE_TRAIN) && !deck->eval.adapter &&
            !deck->eval.model && (deck->train.method != METHOD_LORA || deck->train.export_merged)) {
            bool merged = deck->train.method == METHOD_LORA;
            beside(sw->base_dir, merged ? "merged" : "adapter/adapter.safetensors", path,
                   sizeof path);
            quote(path, value, sizeof value);
            snprintf(assignment, sizeof assignment, "eval.%s=%s", merged ? "model" : "adapter",
                     value);
            apply(deck, assignment, sw, 1, 1, &e);
        }
    }
    if (e.count == 0) {
        int m = deck_finish(deck, messages, 16384);
        if (m) {
            char prefix[MAX_NAME + 64] = "";
            if (point != SWEEP_SHARED)
                snprintf(prefix, sizeof prefix, "sweep point %d (%s): ", point, sw->names[point]);
            add_lines(&e, m, prefix, messages);
        }
    }
    free(messages);
    return e.count;
}

int sweep_plan(struct sweep *sw, const struct deck *deck, char *err, size_t err_size)
{
    struct errors e = {err_size ? err : NULL, err_size, 0, 0};
    if (e.buf) e.buf[0] = '\0';
    sw->base_name = xstrdup(deck->run.name);
    sw->base_dir = xstrdup(deck->run.output_dir);

    /* the first phase that reads a swept key, and every one after it, run per point */
    unsigned read = 0;
    for (int k = 0; k < sw->n_keys; k++) {
        unsigned readers = 0;
        deck_key_readers(sw->keys[k].path, &readers); /* sweep_read checked the key */
        read |= readers;
    }
    int first = deck->n_phases;
    for (int i = 0; i < deck->n_phases && first == deck->n_phases; i++)
        if (read & (1u << deck->phases[i])) first = i;
    sw->n_shared = sw->n_per_point = 0;
    for (int i = 0; i < deck->n_phases; i++) {
        if (i < first)
            sw->shared[sw->n_shared++] = deck->phases[i];
        else
            sw->per_point[sw->n_per_point++] = deck->phases[i];
    }
    if (sw->n_per_point == 0) {
        add_error(&e,
                  "%s:%d:%d: sweep: no phase of this deck (phase: %d listed) reads a swept "
                  "key: every point would be the same run",
                  sw->file, sw->keys[0].line, sw->keys[0].col, deck->n_phases);
        return e.count;
    }

    /* names, which must differ (two values differing only in bytes the name replaces) */
    char name[MAX_NAME + 32];
    for (int p = 0; p < sw->n_points; p++) {
        point_name(sw, p, name, sizeof name);
        if (strlen(name) > MAX_NAME) {
            add_error(&e,
                      "%s: sweep: point %d's name, made of its values, is longer than %d "
                      "bytes: %.60s...",
                      sw->file, p, MAX_NAME, name);
            return e.count;
        }
        for (int q = 0; q < p; q++)
            if (strcmp(sw->names[q], name) == 0) {
                add_error(&e,
                          "%s: sweep: points %d and %d get the same name %s (the same values, "
                          "or values that differ only in characters a name cannot hold)",
                          sw->file, q, p, name);
                return e.count;
            }
        sw->names[p] = xstrdup(name);
    }

    /* every deck the sweep will run, checked now */
    char *messages = xcalloc(16384, 1);
    for (int p = sw->n_shared ? SWEEP_SHARED : 0; p < sw->n_points; p++) {
        struct deck point;
        int n = sweep_deck(sw, p, &point, messages, 16384);
        if (n) add_lines(&e, n, "", messages);
        deck_free(&point);
        if (e.count >= 20) break; /* one bad value fails every point: enough said */
    }
    free(messages);
    return e.count;
}

void sweep_list(const struct sweep *sw, FILE *out)
{
    fprintf(out, "# sweep of %s: %d point%s (%s over", sw->file, sw->n_points,
            sw->n_points == 1 ? "" : "s", sw->mode == SWEEP_GRID ? "grid" : "zip");
    for (int k = 0; k < sw->n_keys; k++) fprintf(out, " %s", sw->keys[k].path);
    fprintf(out, ")\n# shared phases, once, in %s:", sw->base_dir);
    for (int i = 0; i < sw->n_shared; i++) fprintf(out, " %s", phase_name(sw->shared[i]));
    fprintf(out, "%s\n# per-point phases:", sw->n_shared ? "" : " none");
    for (int i = 0; i < sw->n_per_point; i++) fprintf(out, " %s", phase_name(sw->per_point[i]));
    fprintf(out, "\n# point\tname\toutput_dir\n");
    char dir[8400];
    for (int p = 0; p < sw->n_points; p++) {
        sweep_point_dir(sw, p, dir, sizeof dir);
        fprintf(out, "%d\t%s\t%s\n", p, sw->names[p], dir);
    }
}

/* ---- the shared run's mark ------------------------------------------------------------- */

/* The lines of a resolved deck (deck_print) that the phases in `read` read: section
 * headers, comments and `phase` stay; a key line `  KEY: value` of section SECTION goes
 * unless deck_key_readers(SECTION.KEY) meets `read`; deck_print's `# default` marks go. */
static void keep_read_keys(const char *printed, unsigned read, FILE *out)
{
    char section[64] = "", path[256];
    for (const char *line = printed; *line;) {
        size_t n = strcspn(line, "\n");
        bool keep = true;
        if (line[0] != ' ' && line[0] != '#' && n > 1 && line[n - 1] == ':') {
            snprintf(section, sizeof section, "%.*s", (int)(n - 1), line);
        } else if (line[0] == ' ' && line[1] == ' ' && line[2] != ' ' && line[2] != '#') {
            size_t key = strcspn(line + 2, ":\n");
            snprintf(path, sizeof path, "%s.%.*s", section, (int)key, line + 2);
            unsigned readers = 0;
            keep = deck_key_readers(path, &readers) != 0 || (readers & read) != 0;
        }
        /* whether a value is the default or was written out is no difference */
        size_t length = n;
        if (length >= 9 && strncmp(line + length - 9, "# default", 9) == 0) length -= 9;
        while (length > 0 && line[length - 1] == ' ') length--;
        if (keep) fprintf(out, "%.*s\n", (int)length, line);
        line += n + (line[n] == '\n');
    }
}

char *sweep_shared_text(const struct sweep *sw)
{
    struct deck deck;
    char *printed = NULL, *text = NULL;
    size_t size = 0;
    char err[4096];
    unsigned read = 0;
    for (int i = 0; i < sw->n_shared; i++) read |= 1u << sw->shared[i];
    FILE *out = open_memstream(&printed, &size);
    if (!out) fatal(EXIT_RUNTIME, "open_memstream: %s", strerror(errno));
    if (sw->n_shared > 0 && sweep_deck(sw, SWEEP_SHARED, &deck, err, sizeof err) == 0)
        deck_print(&deck, out);
    if (sw->n_shared > 0) deck_free(&deck);
    fclose(out);
    out = open_memstream(&text, &size);
    if (!out) fatal(EXIT_RUNTIME, "open_memstream: %s", strerror(errno));
    fprintf(out,
            "# the shared phases of the sweep of %s ran to the end as this deck (the keys\n"
            "# they read; the points compare theirs with it)\n",
            sw->file);
    keep_read_keys(printed, read, out);
    fclose(out);
    free(printed);
    return text;
}

static void shared_path(const struct sweep *sw, char *buf, size_t size)
{
    snprintf(buf, size, "%s/sweep/shared.yaml", sw->base_dir);
}

static void write_text(FILE *out, const void *text)
{
    fputs(text, out);
}

int sweep_mark_shared(const struct sweep *sw, const char *shared_text, char *err, size_t err_size)
{
    char path[8400];
    snprintf(path, sizeof path, "%s/sweep", sw->base_dir);
    if (make_directories(path) != 0) {
        snprintf(err, err_size, "%s: cannot create: %s", path, strerror(errno));
        return -1;
    }
    shared_path(sw, path, sizeof path);
    return file_write_atomically(path, write_text, shared_text, err, err_size);
}

void sweep_unmark_shared(const struct sweep *sw)
{
    char path[8400];
    shared_path(sw, path, sizeof path);
    if (remove(path) != 0 && errno != ENOENT)
        log_warn("%s: cannot remove: %s", path, strerror(errno));
}

int sweep_check_shared(const struct sweep *sw, char *err, size_t err_size)
{
    if (sw->n_shared == 0) return 0;
    char path[8400], why[4400];
    shared_path(sw, path, sizeof path);
    size_t length = 0;
    char *found = file_read(path, 16 << 20, &length, why, sizeof why);
    if (!found) {
        snprintf(
            err, err_size,
            "the shared phases of this sweep have not run to the end (%s: "
            "%s)\nhint: esft %s --sweep shared runs them once for every point (jobs/esft-sweep "
            "submits it before the points)",
            path, errno == ENOENT ? "not there" : why, sw->file);
        return -1;
    }
    char *expected = sweep_shared_text(sw);
    int status = 0;
    if (strcmp(found, expected) != 0) {
        /* the first line that differs, to say what changed */
        const char *a = found, *b = expected;
        while (*a && *a == *b) a++, b++;
        while (a > found && a[-1] != '\n') a--, b--;
        snprintf(err, err_size,
                 "%s was written by the shared phases of another deck (or "
                 "other overrides) than this one: the points would mix its outputs with this "
                 "deck's; first difference:\n  %s: %.*s\n  this deck: %.*s\nhint: run esft %s "
                 "--sweep shared again (it replaces the shared outputs), or give this deck "
                 "another run.output_dir",
                 path, path, (int)strcspn(a, "\n"), a, (int)strcspn(b, "\n"), b, sw->file);
        status = -1;
    }
    free(found);
    free(expected);
    return status;
}

void sweep_free(struct sweep *sw)
{
    for (int k = 0; k < sw->n_keys; k++) {
        free(sw->keys[k].path);
        for (int v = 0; v < sw->keys[k].n_values; v++) free(sw->keys[k].values[v]);
    }
    for (int p = 0; p < sw->n_points; p++) free(sw->names[p]);
    free(sw->base_name);
    free(sw->base_dir);
    memset(sw, 0, sizeof *sw);
}
