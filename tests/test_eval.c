/* test_eval: the eval phase against transformers on a golden fixture.
 *
 * The fixture's batch (tests/golden/qwen2_moe: two rows of 13 tokens, the second packing
 * samples of 6 and 7) is written as a dataset of its three samples, loss mask = the
 * fixture's labels != -100. Packed at data.seq_len 13 they form the fixture's two rows
 * again, so eval's loss must be transformers' `loss` (mean over the 17 targets), and its
 * accuracy the share of targets that are the argmax of transformers' logits (counted
 * here from the stored logits; every counted row's top logit leads the next by more than
 * the 1e-5 the logits can differ by, or the test says so). Run on 1 rank and, under
 * mpirun with PP EP arguments, split over ranks; eval.batch 1 and 2.
 * Usage: test_eval [GOLDEN_DIR [PP EP]] */
#include <jansson.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "dataset_write.h"
#include "deck.h"
#include "layout.h"
#include "log.h"
#include "phases.h"
#include "safetensors.h"

static int64_t read_i64_at(const struct st_tensor *t, size_t i)
{
    int64_t v;
    memcpy(&v, (const char *)t->data + 8 * i, 8);
    return v;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    log_init(rank, world);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    int pp = argc > 3 ? atoi(argv[2]) : 1, ep = argc > 3 ? atoi(argv[3]) : 1;
    char dir[4096], path[4200], err[1024];
    snprintf(dir, sizeof dir, "%s/qwen2_moe", golden);
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    struct st_file *expected = st_open(path, err, sizeof err);
    CHECK(expected != NULL, "%s", err);
    if (!expected) MPI_Abort(MPI_COMM_WORLD, 1);
    const struct st_tensor *ids = st_file_find(expected, "input_ids");
    const struct st_tensor *labels = st_file_find(expected, "labels");
    const struct st_tensor *segments = st_file_find(expected, "segment_ids");
    const struct st_tensor *logits = st_file_find(expected, "logits");
    const struct st_tensor *loss = st_file_find(expected, "loss");
    CHECK(ids && labels && segments && logits && loss, "fixture tensors");
    int B = (int)ids->shape[0], T = (int)ids->shape[1], V = (int)logits->shape[2];
    size_t N = (size_t)B * T;

    /* the dataset: one sample per segment of a row */
    uint32_t *tokens = xmalloc(N * sizeof *tokens);
    uint8_t *mask = xmalloc(N);
    uint64_t *offsets = xmalloc((N + 1) * sizeof *offsets);
    uint64_t n_samples = 0;
    for (size_t n = 0; n < N; n++) {
        tokens[n] = (uint32_t)read_i64_at(ids, n);
        mask[n] = read_i64_at(labels, n) != -100;
        bool starts = n % (size_t)T == 0 || read_i64_at(segments, n) != read_i64_at(segments, n - 1);
        if (starts) offsets[n_samples++] = n;
    }
    offsets[n_samples] = N;
    /* the expected accuracy: targets whose label is transformers' argmax */
    float *row = xmalloc((size_t)V * sizeof *row);
    int targets = 0, correct = 0;
    double margin = INFINITY;
    for (size_t n = 0; n + 1 < N; n++) {
        if ((n + 1) % (size_t)T == 0 || !mask[n + 1]) continue; /* no target in the row */
        memcpy(row, (const float *)logits->data + n * V, (size_t)V * sizeof *row);
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        for (int v = 0; v < V; v++)
            if (v != best) margin = fmin(margin, (double)row[best] - row[v]);
        targets++;
        correct += best == (int)tokens[n + 1];
    }
    CHECK(targets == 17, "%d targets, the fixture has 17", targets);
    CHECK(margin > 1e-5, "a near-tie in transformers' logits (%.3g): accuracy is not defined", margin);
    float want_loss;
    st_read_f32(loss, &want_loss, 1, err, sizeof err);

    char tmp[64] = "/tmp/esft-eval.XXXXXX";
    if (rank == 0) CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    MPI_Bcast(tmp, sizeof tmp, MPI_CHAR, 0, MPI_COMM_WORLD);
    char data[200];
    snprintf(data, sizeof data, "%s/data.h5", tmp);
    if (rank == 0) {
        struct dataset_contents c = {.tokens = tokens, .loss_mask = mask, .n_tokens = N,
                                     .offsets = offsets, .n_samples = n_samples,
                                     .tokenizer = "fixture", .vocab_size = (uint64_t)V};
        CHECK(dataset_write(data, &c, err, sizeof err) == 0, "%s", err);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    struct layout_grid grid;
    CHECK(layout_grid_make(world, pp, ep, NULL, &grid, err, sizeof err) == 0, "%s", err);
    struct layout layout;
    layout_create(&layout, &grid);
    for (int batch = 1; batch <= 2; batch++) {
        struct deck deck;
        deck_defaults(&deck);
        char o[4][4400];
        snprintf(o[0], sizeof o[0], "model.path=%s", dir);
        snprintf(o[1], sizeof o[1], "data.path=%s", data);
        snprintf(o[2], sizeof o[2], "run.output_dir=%s/out%d", tmp, batch);
        snprintf(o[3], sizeof o[3], "eval.batch=%d", batch);
        for (int i = 0; i < 4; i++) CHECK(deck_override(&deck, o[i], err, sizeof err) == 0, "%s", err);
        CHECK(deck_override(&deck, "data.seq_len=13", err, sizeof err) == 0, "%s", err);
        CHECK(deck_override(&deck, "phase=eval", err, sizeof err) == 0, "%s", err);
        CHECK(deck_finish(&deck, err, sizeof err) == 0, "%s", err);
        CHECK(phase_eval(&deck, &layout) == 0, "phase_eval");
        if (rank == 0) {
            snprintf(path, sizeof path, "%s/out%d/eval.json", tmp, batch);
            json_error_t error;
            json_t *result = json_load_file(path, 0, &error);
            CHECK(result != NULL, "%s: %s", path, error.text);
            double got_loss = json_real_value(json_object_get(result, "loss"));
            double got_accuracy = json_real_value(json_object_get(result, "accuracy"));
            json_int_t got_targets = json_integer_value(json_object_get(result, "targets"));
            CHECK(fabs(got_loss - want_loss) <= 1e-5 * want_loss, "batch %d: loss %.9g, transformers %.9g",
                  batch, got_loss, want_loss);
            CHECK(got_targets == targets, "batch %d: %lld targets, want %d", batch, (long long)got_targets, targets);
            CHECK(got_accuracy == (double)correct / targets, "batch %d: accuracy %.9g, want %d/%d", batch,
                  got_accuracy, correct, targets);
            printf("pp %d ep %d dp %d, eval.batch %d: loss %.7f (transformers %.7f), accuracy %d/%d\n",
                   pp, ep, grid.dp, batch, got_loss, want_loss, correct, targets);
            json_decref(result);
        }
        deck_free(&deck);
    }
    layout_destroy(&layout);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        char command[128];
        snprintf(command, sizeof command, "rm -rf '%s'", tmp);
        CHECK(system(command) == 0, "%s", command);
    }
    free(tokens), free(mask), free(offsets), free(row);
    st_close(expected);
    int status = check_done("test_eval");
    MPI_Finalize();
    return status;
}
