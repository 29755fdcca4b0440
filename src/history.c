/* history: the training history of an output directory (see history.h). */
#include "history.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
