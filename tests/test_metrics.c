/* test_metrics: the run's records. Every metrics.jsonl line is JSON (a non-finite number
 * becomes null), carries the wall-clock time and the run id; the training history read
 * back from a file of several run segments (a run stopped, resumed from an older
 * checkpoint, and a restart from scratch) is the lineage that led to the last segment;
 * durations print for people. Expected values are written out by hand. */
#include <jansson.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "history.h"
#include "log.h"

static void expect_nulls(const char *in, const char *want)
{
    char *got = json_null_nonfinite(in);
    CHECK(strcmp(got, want) == 0, "'%s' -> '%s', want '%s'", in, got, want);
    free(got);
}

static void test_nonfinite(void)
{
    expect_nulls("\"loss\": nan", "\"loss\": null");
    expect_nulls("\"a\": -nan, \"b\": inf, \"c\": -inf", "\"a\": null, \"b\": null, \"c\": null");
    expect_nulls("\"a\": nan,\"b\":nan", "\"a\": null,\"b\":null");
    expect_nulls("\"a\": infinity", "\"a\": null");
    /* inside strings, and as part of longer words, nothing changes */
    expect_nulls("\"name\": \"nan inf\", \"x\": 1", "\"name\": \"nan inf\", \"x\": 1");
    expect_nulls("\"p\": \"a\\\"nan\\\"\", \"q\": 2", "\"p\": \"a\\\"nan\\\"\", \"q\": 2");
    expect_nulls("\"banana\": 1e-5", "\"banana\": 1e-5");
    /* many at once: the result is longer than the input */
    char in[400] = "", want[500] = "";
    for (int i = 0; i < 40; i++) {
        strcat(in, i ? ",nan" : "nan");
        strcat(want, i ? ",null" : "null");
    }
    expect_nulls(in, want);
}

static void test_durations(void)
{
    CHECK(strcmp(duration_text(42.4).text, "42 s") == 0, "%s", duration_text(42.4).text);
    CHECK(strcmp(duration_text(725).text, "12m05s") == 0, "%s", duration_text(725).text);
    CHECK(strcmp(duration_text(3 * 3600 + 7 * 60 + 10).text, "3h07m") == 0, "%s",
          duration_text(3 * 3600 + 7 * 60 + 10).text);
    CHECK(strcmp(duration_text(NAN).text, "?") == 0, "nan");
    CHECK(strcmp(duration_text(INFINITY).text, "?") == 0, "inf");
}

static void test_lines(const char *dir)
{
    metrics_open(dir);
    metrics_write("start", "\"deck\": \"%s\"", "d.yaml");
    metrics_write("step", "\"step\": %d, \"loss\": %.17g, \"norm\": %g", 1, NAN, INFINITY);
    metrics_close();
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "%s", path);
    if (!f) return;
    char line[4096];
    int n = 0;
    const char *run_id = NULL;
    json_t *first = NULL;
    while (fgets(line, sizeof line, f)) {
        json_error_t error;
        json_t *o = json_loads(line, 0, &error);
        CHECK(json_is_object(o), "line %d is not JSON: %s (%s)", n + 1, line, error.text);
        if (!o) continue;
        const char *wall = json_string_value(json_object_get(o, "wall_time"));
        CHECK(wall && strlen(wall) == 20 && wall[4] == '-' && wall[10] == 'T' && wall[19] == 'Z',
              "wall_time %s", wall ? wall : "(none)");
        const char *id = json_string_value(json_object_get(o, "run_id"));
        CHECK(id && id[0], "run_id");
        if (n == 0) {
            first = o;
            run_id = id;
            CHECK(strcmp(json_string_value(json_object_get(o, "event")), "start") == 0, "start");
            n++;
            continue;
        }
        CHECK(run_id && id && strcmp(id, run_id) == 0, "one run id per run");
        CHECK(json_is_null(json_object_get(o, "loss")) && json_is_null(json_object_get(o, "norm")),
              "non-finite numbers are null: %s", line);
        CHECK(json_integer_value(json_object_get(o, "step")) == 1, "step");
        json_decref(o);
        n++;
    }
    json_decref(first);
    fclose(f);
    CHECK(n == 2, "two lines, got %d", n);
}

static void test_history(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "w");
    /* segment 1: steps 1-4 (checkpoints at 2 and 4), evals at 0 and 2; stopped after 4.
     * segment 2: resumed from step 2 (the step-4 checkpoint was corrupt): steps 3-5.
     * a "step" line with loss null (a skipped step) is not a point. */
    fputs("{\"event\": \"start\"}\n"
          "{\"event\": \"train_start\", \"from_step\": 0}\n"
          "{\"event\": \"eval\", \"step\": 0, \"loss\": 9.0}\n"
          "{\"event\": \"step\", \"step\": 1, \"loss\": 8.0}\n"
          "{\"event\": \"step\", \"step\": 2, \"loss\": 7.0}\n"
          "{\"event\": \"eval\", \"step\": 2, \"loss\": 7.5}\n"
          "{\"event\": \"step\", \"step\": 3, \"loss\": 6.0}\n"
          "{\"event\": \"step\", \"step\": 4, \"loss\": 5.0}\n"
          "{\"event\": \"eval\", \"step\": 4, \"loss\": 5.5}\n"
          "{\"event\": \"train_start\", \"from_step\": 2}\n"
          "{\"event\": \"step\", \"step\": 3, \"loss\": 6.1}\n"
          "{\"event\": \"step\", \"step\": 4, \"loss\": null}\n"
          "{\"event\": \"step\", \"step\": 5, \"loss\": 4.0}\n"
          "{\"event\": \"eval\", \"step\": 5, \"loss\": 4.5}\n"
          "{\"event\": \"step\", \"step\": 6, \"lo",
          f);
    fclose(f);
    struct curve train = {0}, eval = {0};
    char err[512] = "";
    CHECK(history_read(dir, &train, &eval, err, sizeof err) == 0, "%s", err);
    const long long want_steps[] = {1, 2, 3, 5};
    const double want_loss[] = {8.0, 7.0, 6.1, 4.0};
    CHECK(train.n == 4, "train points %d", train.n);
    for (int i = 0; i < train.n && i < 4; i++)
        CHECK(train.step[i] == want_steps[i] && train.loss[i] == want_loss[i],
              "point %d: step %lld loss %g", i, train.step[i], train.loss[i]);
    const long long want_eval_steps[] = {0, 2, 5};
    const double want_eval[] = {9.0, 7.5, 4.5};
    CHECK(eval.n == 3, "eval points %d", eval.n);
    for (int i = 0; i < eval.n && i < 3; i++)
        CHECK(eval.step[i] == want_eval_steps[i] && eval.loss[i] == want_eval[i],
              "eval point %d: step %lld loss %g", i, eval.step[i], eval.loss[i]);
    curve_free(&train), curve_free(&eval);

    /* a restart from scratch in the same directory starts a new history */
    f = fopen(path, "a");
    fputs("\n{\"event\": \"train_start\", \"from_step\": 0}\n"
          "{\"event\": \"step\", \"step\": 1, \"loss\": 3.0}\n", f);
    fclose(f);
    CHECK(history_read(dir, &train, &eval, err, sizeof err) == 0, "%s", err);
    CHECK(train.n == 1 && train.loss[0] == 3.0 && eval.n == 0, "restart: %d points, %d evals",
          train.n, eval.n);
    curve_free(&train), curve_free(&eval);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    log_init(0, 1);
    char dir[] = "/tmp/esft-test-metrics.XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    test_nonfinite();
    test_durations();
    test_lines(dir);
    test_history(dir);
    char command[4200];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
    MPI_Finalize();
    return check_done("test_metrics");
}
